-- A worker takes a queued task: the task becomes running under the worker's run token.
-- KEYS: 1 the task's state record
-- ARGV: 1 now (ISO 8601), 2 worker id, 3 run token, 4 lease (ms)
-- Returns {1, attempt} when this worker now runs the task (attempt counts from 1), or
-- {0, state} when the task is not queued: cancelled meanwhile, taken by another worker (a
-- second job of one start, see start.lua), or ended. The caller then drops its job.
-- The lease is measured on the Redis server's clock (TIME), never a worker's.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record = KEYS[1]
local now, worker, run, lease_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local state = redis.call('HGET', record, 'state')
if state ~= 'queued' then return {0, state or ''} end
local attempt = redis.call('HINCRBY', record, 'attempt', 1)
redis.call('HSET', record, 'state', 'running', 'worker', worker, 'run', run,
           'running_since', now, 'lease_until', now_ms + lease_ms)
return {1, attempt}
