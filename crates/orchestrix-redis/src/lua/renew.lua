-- renew (after fence.lua): ARGV[2] the new lease (ms) from now.
redis.call('PEXPIRE', key, ARGV[2])
return 1
