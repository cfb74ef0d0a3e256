-- Record the id of a task's entry in the job queue, once start.lua's caller has added it.
-- KEYS: 1 the task's state record
-- ARGV: 1 the job entry's id
-- Returns 1 when recorded, 0 when the task is no longer queued (a worker began it already, or it
-- was cancelled or has expired): then nothing is written, so a record that expired meanwhile is
-- never brought back as a hash with no state and no TTL.
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[1])
redis.call('HDEL', KEYS[1], 'starting_until')
return 1
