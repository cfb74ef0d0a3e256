-- Remove a task's keys because its row is gone, unless a run is going: that one is cancelled by
-- the caller instead (its keys then expire like every ended task's), since a run whose record
-- vanished under it would write its stream anew.
-- KEYS: 1 the task's state record, 2 its event stream
-- Returns the state before ('' when there was no record); the keys are gone unless 'running'.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then return state end
redis.call('DEL', KEYS[1], KEYS[2])
return state or ''
