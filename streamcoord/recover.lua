-- Judge a job taken over from a worker that stopped renewing it (dead, paused, leaving).
-- KEYS: 1 the task's state record
-- ARGV: 1 new run token, 2 lease (ms), 3 worker id, 4 max attempts, 5 now (ISO 8601)
-- Returns {verdict, attempt}, the verdict one of
--   rerun      the lease expired: this worker owns the task now and runs attempt <attempt>
--   exhausted  the lease expired on the last allowed attempt: this worker owns it, to fail it
--   cancel     the lease expired and a cancel was asked for (cancel_requested_at): this worker
--              owns it, to end it with 'cancelled'. The request went to the stopped worker's
--              control stream, which nobody reads any more: running it again would drop it
--   alive      the lease has not expired (a paused worker may come back): try later
--   queued     never began: run it as usual
--   missing    no record (expired, deleted): nothing to run
--   or the task's state itself (pending, cancelling, completed, failed, cancelled): nothing to
--   run ('cancelling': a cancel cut off before its 'cancelled' event; the caller writes it)
-- Taking over writes a new run token, so the old run is fenced off: append.lua refuses it.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record = KEYS[1]
local run, lease_ms, worker, max_attempts, now =
  ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5]

local cur = redis.call('HMGET', record, 'state', 'lease_until', 'attempt', 'cancel_requested_at')
local attempt = tonumber(cur[3] or '0')
if cur[1] ~= 'running' then return {cur[1] or 'missing', attempt} end
if tonumber(cur[2] or '0') > now_ms then return {'alive', attempt} end
redis.call('HSET', record, 'run', run, 'worker', worker, 'lease_until', now_ms + lease_ms)
if cur[4] then return {'cancel', attempt} end
if attempt < max_attempts then
  attempt = redis.call('HINCRBY', record, 'attempt', 1)
  redis.call('HSET', record, 'running_since', now)
  return {'rerun', attempt}
end
return {'exhausted', attempt}
