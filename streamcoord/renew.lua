-- A worker renews the lease of one of its runs.
-- KEYS: 1 the task's state record
-- ARGV: 1 run token, 2 lease (ms), 3 worker id
-- Returns 1 while the run is still this worker's (lease extended if running), 0 when another
-- run owns the task (a worker that took it over after this one's lease ran out): the caller
-- must stop that run.
-- A record with no run at all (Redis lost it: a restart without persistence; or an append
-- rebuilt it first) is claimed back for the run, which goes on and says so in the record.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record = KEYS[1]
local run, lease_ms, worker = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local cur = redis.call('HMGET', record, 'run', 'state')
if cur[1] == run then
  if cur[2] == 'running' then redis.call('HSET', record, 'lease_until', now_ms + lease_ms) end
  return 1
end
if cur[1] == false and (cur[2] == false or cur[2] == 'running') then
  redis.call('HSET', record, 'state', 'running', 'run', run, 'worker', worker,
             'lease_until', now_ms + lease_ms)
  return 1
end
return 0
