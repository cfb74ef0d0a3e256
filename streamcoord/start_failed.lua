-- A start could not add its job (start.lua answered add = 1, then the XADD failed): give its
-- turn up, so the next start of the task adds the job at once instead of after the grace.
-- KEYS: 1 the task's state record
-- ARGV: none
-- Returns 1 when the record still waited for a job, else 0 (nothing changes: a worker began the
-- task, it was cancelled, or another start added the job meanwhile).
local cur = redis.call('HMGET', KEYS[1], 'state', 'job')
if cur[1] ~= 'queued' or cur[2] ~= false then return 0 end
redis.call('HSET', KEYS[1], 'starting_until', 0)
return 1
