-- A worker that shuts down gives a running task up: its lease ends now, so another worker takes
-- the task over at its next recovery round instead of a whole lease later.
-- KEYS: 1 the task's state record
-- ARGV: 1 run token
-- Returns 1 when released, 0 when the run was no longer this worker's or the task not running.
local cur = redis.call('HMGET', KEYS[1], 'run', 'state')
if cur[1] ~= ARGV[1] or cur[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', 0)
return 1
