-- Ask for a task to be cancelled.
-- KEYS: 1 the task's state record
-- ARGV: 1 now (ISO 8601)
-- Returns {state before, worker}: the caller finishes what this started. A pending or queued
-- task becomes 'cancelling' (no worker will begin it: begin.lua wants 'queued') and the caller
-- appends its 'cancelled' event; a running one keeps running with the request noted, and the
-- caller tells its worker on the worker's control stream. Any other state: nothing changes.
local cur = redis.call('HMGET', KEYS[1], 'state', 'worker')
local state = cur[1]
if state == 'pending' or state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelling', 'cancel_requested_at', ARGV[1])
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested_at', ARGV[1])
end
return {state or '', cur[2] or ''}
