-- append, renew, suspend and release (before durable_fence.lua): anything but the
-- caller's running record is stale.
local function not_owned() return 0 end
