-- Make an ended task (completed, failed or cancelled) new again, for another run: one atomic
-- step on its two keys (one hash slot), so a retry never races a start or a second retry.
-- The old run's stream goes: a retried task has one terminal event again, and the next run's
-- first event starts a stream with another epoch, so a client resuming the old one gets
-- 'reset'. The record becomes 'pending'; the caller then starts it (start.lua) as usual.
-- KEYS: 1 the task's state record, 2 its event stream
-- ARGV: 1 now (ISO 8601)
-- Returns {retried, state before}: retried is 1 when the task was ended and is pending now;
-- the state before is '' when there was no record (nothing is changed then, or when the task
-- has not ended: a start covers a pending task, and a queued or running one is left alone).
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'completed' and state ~= 'failed' and state ~= 'cancelled' then
  return {0, state or ''}
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'pending', 'created_at', ARGV[1])
return {1, state}
