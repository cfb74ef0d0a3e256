-- Append events to task streams: each append one atomic step, safe to retry.
-- KEYS: per event, the task's events stream and state record (one hash tag, so one cluster slot).
--       A batch may hold events of several tasks (one Redis only: a cluster gets one per call).
-- ARGV: 1 maxlen, 2 stream ttl s, 3 state ttl s, 4 now (ISO 8601), then per event, in this
--       order (publisher.Append names them the same, in the same order, after its two keys):
--       epoch, seq, type, data,
--       terminal  the state the event ends the run in ('completed', 'failed', 'cancelled'), or ''
--       final     the run's final value as JSON, or ''
--       writer    the writer's token (names one TaskWriter; tells its own retry from another's write)
--       run       the run token ('' outside a worker run): while a worker runs the task, only the
--                 current run may append; a run whose lease another worker took over is fenced off
-- Each event written is also published, in the same atomic step, on the task's shard channel
-- (<events key without :events>:live, same hash tag) as '<seq>\n<epoch>\n<type>\n<data>'
-- (codec.live_message): gateways follow streams by these messages and read the stream itself
-- only to fill a gap (see hub.py). SPUBLISH needs Redis 7.
-- Returns one {status, epoch, last_seq} per event; status is one of
--   ok      written as <seq>-0
--   dup     this very event is already written as seq (a retry whose first reply was lost): the
--           entry at seq holds the same type and data (or was trimmed away, long behind)
--   stale   seq is taken by another event of this writer: an append whose caller gave up on it
--           (cancelled, timed out) landed after the writer had re-read the stream. The writer
--           numbers this event again; answering 'dup' here would drop it silently
--   ended   the run already has its terminal event
--   fenced  another writer's epoch owns the stream, another writer wrote seq, seq skips ahead,
--           or the task's current run is not this writer's
--   lost    the stream does not follow on from seq: it vanished, or this writer's last events
--           did (Redis lost data), or an earlier append of this writer has not landed yet. The
--           writer re-reads to tell which: on lost data it starts the stream anew under a new
--           epoch, and readers get a reset; else it numbers the event again
--   invalid the task's keys hold something else than a stream and a hash (written by hand):
--           nothing is written, and the other events of the call are not affected
local maxlen, stream_ttl, state_ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function append(events, state, epoch, seq, etype, data, terminal, final, writer, run)
  -- A wrong type would raise mid-call and fail every event of the batch: answer for this one.
  -- (TYPE stands in for EXISTS, and the record is read with pcall: no call is added for it.)
  local events_kind = redis.call('TYPE', events)['ok']
  local cur = redis.pcall('HMGET', state, 'epoch', 'last_seq', 'state', 'writer', 'run')
  if cur.err or (events_kind ~= 'stream' and events_kind ~= 'none') then
    return {'invalid', '', 0}
  end
  local cur_epoch = cur[1] or ''
  local last = cur[2] and tonumber(cur[2]) or 0
  local ended = cur[3] == 'completed' or cur[3] == 'failed' or cur[3] == 'cancelled'

  if cur[5] and cur[5] ~= run and (run ~= '' or cur[3] == 'running') then
    return {'fenced', cur_epoch, last}
  end
  local exists = events_kind == 'stream'
  if exists and seq == 1 and cur_epoch ~= epoch and cur[4] == writer then
    -- This writer lost its stream's tail (a failover) and starts the stream anew.
    redis.call('DEL', events)
    exists = false
  end
  if not exists then
    if ended then return {'ended', cur_epoch, last} end
    if seq ~= 1 then return {'lost', cur_epoch, last} end
    -- A new stream, so a new epoch: forget what an earlier incarnation left in the record.
    redis.call('HDEL', state, 'ended_at', 'end_data', 'final_value')
    redis.call('PERSIST', state)
  else
    if cur_epoch ~= epoch then return {'fenced', cur_epoch, last} end
    if seq <= last then
      if cur[4] ~= writer then return {'fenced', cur_epoch, last} end
      local id = seq .. '-0'
      local entry = redis.call('XRANGE', events, id, id)[1]
      if entry == nil then return {'dup', cur_epoch, last} end
      local f = entry[2]  -- epoch, <epoch>, type, <type>, data, <data>: as written below
      if f[4] == etype and f[6] == data then return {'dup', cur_epoch, last} end
      return {'stale', cur_epoch, last}
    end
    if ended then return {'ended', cur_epoch, last} end
    if seq ~= last + 1 then
      if cur[4] == writer then return {'lost', cur_epoch, last} end  -- our own tail is gone
      return {'fenced', cur_epoch, last}
    end
  end

  redis.call('XADD', events, 'MAXLEN', maxlen, seq .. '-0', 'epoch', epoch, 'type', etype, 'data', data)
  redis.call('SPUBLISH', string.sub(events, 1, -7) .. 'live', seq .. '\n' .. epoch .. '\n' .. etype .. '\n' .. data)
  -- Only what changed: an ordinary event updates three fields.
  local fields = {'last_seq', seq, 'last_type', etype, 'updated_at', now}
  local function set(name, value) table.insert(fields, name); table.insert(fields, value) end
  if cur_epoch ~= epoch then set('epoch', epoch) end
  if cur[4] ~= writer then set('writer', writer) end
  -- The fence above let this run through: it is the task's run (this also rebuilds the run
  -- of a record Redis lost, so the worker's lease renewal still finds it ours).
  if run ~= '' and cur[5] ~= run then set('run', run) end
  if seq == 1 then set('started_at', now) end
  if terminal ~= '' then
    set('state', terminal); set('ended_at', now); set('end_data', data)
    if final ~= '' then set('final_value', final) end
  elseif cur[3] ~= 'running' then
    set('state', 'running')
  end
  redis.call('HSET', state, unpack(fields))
  if terminal ~= '' then
    redis.call('EXPIRE', events, stream_ttl)
    redis.call('EXPIRE', state, state_ttl)
  end
  return {'ok', epoch, seq}
end

local replies = {}
for i = 1, #KEYS / 2 do
  local a = 4 + (i - 1) * 8
  replies[i] = append(KEYS[2 * i - 1], KEYS[2 * i], ARGV[a + 1], tonumber(ARGV[a + 2]),
                      ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8])
end
return replies
