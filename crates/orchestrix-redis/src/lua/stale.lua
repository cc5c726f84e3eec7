-- renew and release (before fence.lua): anything but the caller's running record is stale.
local function not_running() return 0 end
