-- Start a task: one atomic step on its state record, so two callers starting the same task at
-- once (two gateways' lazy starts, a view and a retry) resolve to one start.
-- The job's entry in the queue stream is added by the caller afterwards: the queue lives in
-- another hash slot, so no script can do both in a Redis Cluster. The caller then records the
-- entry's id in the record's 'job' field (job_added.lua), or, when it could not add the job,
-- says so (start_failed.lua).
-- KEYS: 1 the task's state record
-- ARGV: 1 now (ISO 8601)
--       2 mode: 'start' (from no record or 'pending') or 'lazy' (from 'pending' only: a gateway
--         never starts a task Redis does not know as pending)
--       3 grace (ms): how long a start may take to add its job before another may do it instead
-- Returns {add, state before}: add is 1 when the caller must add the job now, else 0; the state
-- before is '' when there was no record.
-- Why 'queued' without 'job' may also answer add = 1: it is a start whose job never reached the
-- queue (the caller's XADD failed, or it died in between). Without this every later start
-- would answer "already queued" and no worker would ever see the task. While the start that
-- flipped the record may still be adding its job ('starting_until', Redis clock), others leave
-- it alone, so racing starters add one job, not one each; a start that failed gives its turn
-- up at once. Should two jobs ever exist, only one worker's begin.lua takes the task.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record = KEYS[1]
local now, mode, grace_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cur = redis.call('HMGET', record, 'state', 'job', 'starting_until')
local state = cur[1]

if state == 'pending' or (state == false and mode == 'start') then
  redis.call('HSET', record, 'state', 'queued', 'queued_at', now, 'starting_until', now_ms + grace_ms)
  redis.call('HDEL', record, 'job')
  if state == false then redis.call('HSET', record, 'created_at', now) end
  return {1, state or ''}
end
if state == 'queued' and cur[2] == false and tonumber(cur[3] or '0') <= now_ms then
  redis.call('HSET', record, 'starting_until', now_ms + grace_ms)
  return {1, state}
end
return {0, state or ''}
