-- Start a task: one atomic step on its state record, so two callers starting the same task at
-- once (two gateways' lazy starts, a view and a retry) resolve to one start.
-- The job's entry in the queue stream is added by the caller afterwards: the queue lives in
-- another hash slot, so no script can do both in a Redis Cluster. The caller then records the
-- entry's id in the record's 'job' field (job_added.lua).
-- KEYS: 1 the task's state record
-- ARGV: 1 now (ISO 8601)
--       2 mode: 'start' (from no record or 'pending') or 'lazy' (from 'pending' only: a gateway
--         never starts a task Redis does not know as pending)
-- Returns {add, state before}: add is 1 when the caller must add the job now, else 0; the state
-- before is '' when there was no record.
-- Why 'queued' without 'job' also answers add = 1: it is a start whose job never reached the
-- queue (the caller's XADD failed or it died in between). Without this every later start would
-- answer "already queued" and no worker would ever see the task. Two callers may then both add
-- a job; that is harmless: only one worker's begin.lua takes the task, the other job is dropped.
local record = KEYS[1]
local now, mode = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', record, 'state', 'job')
local state = cur[1]

if state == 'pending' or (state == false and mode == 'start') then
  redis.call('HSET', record, 'state', 'queued', 'queued_at', now)
  redis.call('HDEL', record, 'job')
  if state == false then redis.call('HSET', record, 'created_at', now) end
  return {1, state or ''}
end
if state == 'queued' and cur[2] == false then
  return {1, state}
end
return {0, state or ''}
