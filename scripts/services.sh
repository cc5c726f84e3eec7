# Shared by scripts/test and the benchmarks: make sure the services the tests talk to
# answer on loopback, starting them when they do not. Source it; it defines functions.
# Every service listens on 127.0.0.1 only.

: "${REDIS_URL:=redis://127.0.0.1:6379}"
: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/test}"
export REDIS_URL DATABASE_URL

log() { printf '[services] %s\n' "$*" >&2; }

# PIDs of services this script started itself, stopped by stop_started_services.
STARTED_PIDS=()

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  log "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/orchestrix-redis.log
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "redis did not come up"; return 1
}

ensure_postgres() {
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
      log "starting PostgreSQL"
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
    for _ in $(seq 100); do
      pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && break
      sleep 0.1
    done
  fi
  pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL is not answering on 127.0.0.1:5432"; return 1; }
  if ! psql "postgres://postgres@127.0.0.1:5432/postgres" -tAc "select 1 from pg_database where datname='test'" | grep -q 1; then
    psql "postgres://postgres@127.0.0.1:5432/postgres" -qc "create database test" >/dev/null
  fi
}

# A DynamoDB-compatible server (moto, pinned) in its own venv, reused across runs, on a free
# loopback port. Exports the endpoint and the dummy credentials the DynamoDB tests read.
start_dynamodb() {
  local moto_version=5.2.5
  local venv="${ORCHESTRIX_CACHE:-$HOME/.cache/orchestrix}/moto-venv"
  if ! "$venv/bin/python" -c "import importlib.metadata as m, flask; assert m.version('moto') == '$moto_version'" >/dev/null 2>&1; then
    log "installing moto[server]==$moto_version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$moto_version"
  fi
  local port
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  log "starting moto on 127.0.0.1:$port"
  # Not `moto_server`: it serves every connection on a thread of its own and does not lock
  # its tables, so two conditional writes on one item can both succeed. Served from one
  # thread, each request is atomic, as DynamoDB's conditional writes are.
  MOTO_PORT="$port" "$venv/bin/python" -c '
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app)
run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app),
           threaded=False, request_handler=MotoRequestHandler)
' "$port" >/tmp/orchestrix-moto.log 2>&1 &
  STARTED_PIDS+=("$!")
  for _ in $(seq 300); do
    if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" >/dev/null 2>&1; then
      export DYNAMODB_ENDPOINT="http://127.0.0.1:$port"
      export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
      return 0
    fi
    sleep 0.1
  done
  log "moto did not come up (see /tmp/orchestrix-moto.log)"; return 1
}

# A Redis Cluster of 3 primaries and 3 replicas on loopback ports 7101-7106 (override with
# REDIS_CLUSTER_PORTS), for the cluster tests only. Each node runs from its own config file,
# <REDIS_CLUSTER_DIR>/<port>/redis.conf, so a test that kills a node restarts it with
# `redis-server <that file>` and it rejoins the cluster (as a replica, once its replica was
# promoted). A cluster that already answers `cluster_state:ok` on every node is reused; a
# node that is down is restarted from its file; a cluster that cannot be mended so is
# rebuilt from scratch. Exports REDIS_CLUSTER_NODES (comma-separated redis:// URLs) and
# REDIS_CLUSTER_DIR. Nodes this function started are shut down by stop_started_services.
# A short cluster-node-timeout makes a failover take about a second, not fifteen.
: "${REDIS_CLUSTER_PORTS:=7101 7102 7103 7104 7105 7106}"
: "${REDIS_CLUSTER_DIR:=${TMPDIR:-/tmp}/orchestrix-redis-cluster}"
STARTED_CLUSTER_PORTS=()

redis_cluster_node_ok() {
  redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

redis_cluster_ok() {
  local port
  for port in $REDIS_CLUSTER_PORTS; do
    redis_cluster_node_ok "$port" || return 1
  done
  # Every node must also agree on three primaries with a replica each.
  local first="${REDIS_CLUSTER_PORTS%% *}"
  [ "$(redis-cli -h 127.0.0.1 -p "$first" cluster nodes 2>/dev/null | grep -v fail | grep -c master)" = 3 ] &&
    [ "$(redis-cli -h 127.0.0.1 -p "$first" cluster nodes 2>/dev/null | grep -v fail | grep -c slave)" = 3 ]
}

start_redis_cluster_node() {
  local port="$1" dir="$REDIS_CLUSTER_DIR/$1"
  mkdir -p "$dir"
  cat >"$dir/redis.conf" <<CONF
port $port
bind 127.0.0.1
daemonize yes
dir $dir
logfile $dir/redis.log
pidfile $dir/redis.pid
save ""
appendonly no
cluster-enabled yes
cluster-config-file $dir/nodes.conf
cluster-node-timeout 1000
cluster-replica-validity-factor 0
CONF
  redis-server "$dir/redis.conf"
  STARTED_CLUSTER_PORTS+=("$port")
}

wait_redis_cluster_ok() {
  for _ in $(seq "${1:-100}"); do
    redis_cluster_ok && return 0
    sleep 0.1
  done
  return 1
}

ensure_redis_cluster() {
  export REDIS_CLUSTER_DIR
  REDIS_CLUSTER_NODES="$(for port in $REDIS_CLUSTER_PORTS; do printf 'redis://127.0.0.1:%s,' "$port"; done)"
  export REDIS_CLUSTER_NODES="${REDIS_CLUSTER_NODES%,}"
  redis_cluster_ok && return 0
  command -v redis-server >/dev/null 2>&1 || ensure_redis
  local port
  # Mend: restart the nodes that are down from their files; they rejoin by themselves.
  if [ -d "$REDIS_CLUSTER_DIR" ]; then
    for port in $REDIS_CLUSTER_PORTS; do
      if ! redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && [ -f "$REDIS_CLUSTER_DIR/$port/nodes.conf" ]; then
        log "restarting redis cluster node 127.0.0.1:$port"
        redis-server "$REDIS_CLUSTER_DIR/$port/redis.conf"
        STARTED_CLUSTER_PORTS+=("$port")
      fi
    done
    wait_redis_cluster_ok 100 && return 0
  fi
  # Rebuild from scratch.
  log "creating a redis cluster (3 primaries, 3 replicas) on 127.0.0.1 ports $REDIS_CLUSTER_PORTS"
  for port in $REDIS_CLUSTER_PORTS; do
    redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
  rm -rf "$REDIS_CLUSTER_DIR"
  for port in $REDIS_CLUSTER_PORTS; do
    start_redis_cluster_node "$port"
  done
  for port in $REDIS_CLUSTER_PORTS; do
    for _ in $(seq 50); do
      redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  # shellcheck disable=SC2046
  redis-cli --cluster create $(for port in $REDIS_CLUSTER_PORTS; do printf '127.0.0.1:%s ' "$port"; done) \
    --cluster-replicas 1 --cluster-yes >"$REDIS_CLUSTER_DIR/create.log" 2>&1 ||
    { log "redis-cli --cluster create failed (see $REDIS_CLUSTER_DIR/create.log)"; return 1; }
  wait_redis_cluster_ok 300 || { log "the redis cluster did not reach cluster_state:ok"; return 1; }
}

stop_started_services() {
  for pid in "${STARTED_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for port in "${STARTED_CLUSTER_PORTS[@]}"; do
    redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
}
