-- Append one event to a task's stream: one atomic step, safe to retry.
-- KEYS: 1 events stream, 2 state hash (one hash tag, so one cluster slot)
-- ARGV: 1 epoch, 2 seq, 3 type, 4 data, 5 maxlen, 6 terminal state or '',
--       7 stream ttl s, 8 state ttl s, 9 now (ISO 8601), 10 final value JSON or '',
--       11 writer token (names one TaskWriter; tells its own retry from another's write),
--       12 run token ('' outside a worker run): while a worker runs the task, only the
--          current run may append; a run whose lease another worker took over is fenced off
-- Returns {status, epoch, last_seq}; status is one of
--   ok      written as <seq>-0
--   dup     this writer already wrote seq in this epoch (a retry whose first reply was lost)
--   ended   the run already has its terminal event
--   fenced  another writer's epoch owns the stream, another writer wrote seq, seq skips ahead,
--           or the task's current run is not this writer's
--   lost    the stream vanished under a writer past its first event
local events, state = KEYS[1], KEYS[2]
local epoch, seq = ARGV[1], tonumber(ARGV[2])
local cur = redis.call('HMGET', state, 'epoch', 'last_seq', 'state', 'writer', 'run')
local cur_epoch = cur[1] or ''
local last = cur[2] and tonumber(cur[2]) or 0
local ended = cur[3] == 'completed' or cur[3] == 'failed' or cur[3] == 'cancelled'

if cur[5] and cur[5] ~= ARGV[12] and (ARGV[12] ~= '' or cur[3] == 'running') then
  return {'fenced', cur_epoch, last}
end

if redis.call('EXISTS', events) == 0 then
  if ended then return {'ended', cur_epoch, last} end
  if seq ~= 1 then return {'lost', cur_epoch, last} end
  -- A new stream, so a new epoch: forget what an earlier incarnation left in the record.
  redis.call('HDEL', state, 'ended_at', 'end_data', 'final_value')
  redis.call('PERSIST', state)
else
  if cur_epoch ~= epoch then return {'fenced', cur_epoch, last} end
  if seq <= last then
    if cur[4] == ARGV[11] then return {'dup', cur_epoch, last} end
    return {'fenced', cur_epoch, last}
  end
  if ended then return {'ended', cur_epoch, last} end
  if seq ~= last + 1 then return {'fenced', cur_epoch, last} end
end

redis.call('XADD', events, 'MAXLEN', ARGV[5], seq .. '-0',
           'epoch', epoch, 'type', ARGV[3], 'data', ARGV[4])
local fields = {'epoch', epoch, 'last_seq', seq, 'last_type', ARGV[3], 'updated_at', ARGV[9],
                'writer', ARGV[11]}
if ARGV[12] ~= '' then
  -- The fence above let this run through: it is the task's run (this also rebuilds the run
  -- of a record Redis lost, so the worker's lease renewal still finds it ours).
  table.insert(fields, 'run'); table.insert(fields, ARGV[12])
end
if seq == 1 then
  table.insert(fields, 'started_at'); table.insert(fields, ARGV[9])
end
if ARGV[6] ~= '' then
  for _, v in ipairs({'state', ARGV[6], 'ended_at', ARGV[9], 'end_data', ARGV[4]}) do
    table.insert(fields, v)
  end
  if ARGV[10] ~= '' then
    table.insert(fields, 'final_value'); table.insert(fields, ARGV[10])
  end
else
  table.insert(fields, 'state'); table.insert(fields, 'running')
end
redis.call('HSET', state, unpack(fields))
if ARGV[6] ~= '' then
  redis.call('EXPIRE', events, ARGV[7])
  redis.call('EXPIRE', state, ARGV[8])
end
return {'ok', epoch, seq}
