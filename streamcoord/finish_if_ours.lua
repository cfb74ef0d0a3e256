-- Acknowledge a job and drop it from the queue, only if it is still pending under this worker.
-- A worker whose begin.lua was refused (the task was not queued) drops its entry; but a begin
-- slower than a lease lets another worker claim the entry (XAUTOCLAIM) and begin the task from
-- it, and XACK is not per consumer: acknowledging it then would drop that worker's job. The
-- check and the acknowledgement are one step, so no claim can come in between.
-- KEYS: 1 the job queue stream
-- ARGV: 1 consumer group, 2 this worker's consumer name, 3 the entry id
-- Returns 1 when acknowledged and deleted, 0 when the entry is not pending under this worker.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #pending == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
