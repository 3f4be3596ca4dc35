#!lua flags=allow-oom
--[[
  ack: finish a batch of jobs one node ran to completion. Fenced per attempt: a job is finished
  only if the attempt named is the job's current attempt and the job is still in this node's
  active set; otherwise its lease was reaped (and the job perhaps claimed again, even by this
  node: a newer attempt) or it was never claimed here, and the ack is refused, changing nothing.
  A repeated ack of an attempt that already finished the job (a call re-sent after a lost reply)
  answers 0: the job hash records the attempt that finished it ("finished_by" = node:attempt);
  with retention 0 the hash is deleted at once, so the call's id is recorded instead (the node's
  last 64 calls, kept 60 s). A finished job keeps its result for retention_ms, then expires
  (retention 0 deletes it at once); its unique key is released. The queue keeps at most
  finished_max finished jobs: past it, the oldest are deleted (at most n + 100 per call, so a
  lowered cap is reached over the following calls). Allowed under OOM.

  KEYS[1]  active    ZSET  jobq:{q}:active:<node>
  KEYS[2]  leases    ZSET  jobq:{q}:leases
  KEYS[3]  finished  ZSET  jobq:{q}:finished      member = job id, score = expiry ms
  KEYS[4]  events    STREAM jobq:{q}:events      "done" per finished job
  KEYS[5]  guard     NONE  jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>,
  jobq:{q}:acked:<node> (ZSET, member = call id, score = ms; retention 0 only, expires),
  jobq:{q}:wait:<id> (STRING, read only: set by a caller waiting for the result). A finished job
  whose wait key exists is announced on the channel jobq:{q}:done: "<id> d<result>" when the
  result has at most 1024 bytes, else "<id>" (the caller reads the job).

  ARGV[1]  qprefix       "jobq:{q}:"
  ARGV[2]  node          the acking node's id; KEYS[1] must be its active set
  ARGV[3]  now_ms        integer ms, or "" for the Redis server clock
  ARGV[4]  retention_ms  integer >= 0
  ARGV[5]  finished_max  integer >= 0, most finished jobs the queue keeps (0 = no count bound)
  ARGV[6]  n             number of jobs, 1..500; more than one carry at most 2 MiB of results
  ARGV[7]  call_id       "" or 1..64 letters, digits, "-" or "_": the same for every send of one
                         call (tells a re-sent call from a new one when retention is 0)
  then 3 fields per job: id, attempt (the attempt number the claim returned; "" = the attempt
  this node holds), result (msgpack bytes, "" = no result)
  then, last:
  ARGV[8 + 3n]  events_max  integer >= 0, the events stream's length cap (0 = no events)

  Returns: one code per job: 1 finished, 0 already finished by this attempt (a repeated call),
           -1 no such job, -2 refused: the job is not this attempt's (stale completion).
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(n * log N); per job HMGET, ZREM, EXISTS and HSET + PEXPIRE (or DEL), a PUBLISH if
           waited for; past finished_max,
           per deleted finished job one HMGET and one DEL (at most n + 100).
]]
local active_key, leases_key, finished_key = KEYS[1], KEYS[2], KEYS[3]
local qprefix, node, call_id = ARGV[1], ARGV[2], ARGV[7]

if #KEYS ~= 5 then return badarg('keys', 'expected 5 keys') end
local e = bad_qprefix(qprefix) or bad_node(node)
if e then return e end
if active_key ~= qprefix .. 'active:' .. node then return badarg('node', 'does not match KEYS[1]') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local now_s = fmt_int(now)
local retention = int_arg(ARGV[4])
if retention == nil or retention < 0 then return badarg('retention_ms', 'must be >= 0') end
local finished_max = int_arg(ARGV[5])
if finished_max == nil or finished_max < 0 then return badarg('finished_max', 'must be >= 0') end
local n = int_arg(ARGV[6])
if n == nil or n < 1 or n > 500 then return badarg('n', 'must be 1..500') end
if #ARGV ~= 8 + 3 * n then return badarg('argv', 'expected ' .. (8 + 3 * n) .. ' values') end
e = bad_events(qprefix); if e then return e end
if type(call_id) ~= 'string' or #call_id > 64 or not string.find(call_id, '^[%w_-]*$') then
  return badarg('call_id', 'must be 0..64 letters, digits, - or _')
end
local bytes = 0
for i = 1, n do
  e = bad_id(ARGV[5 + 3 * i]); if e then return e end
  bytes = bytes + #ARGV[7 + 3 * i]
  if i > 1 and bytes > MAX_BATCH_BYTES then return badarg('n', 'results over 2 MiB: split the batch') end
  local a = ARGV[6 + 3 * i]
  if a ~= '' then
    a = int_arg(a)
    if a == nil or a < 1 then return badarg('attempt', 'must be an integer >= 1 or empty') end
  end
end

local codes = {}
local n_finished, n_deleted = 0, 0
local expire_at = now + retention
-- Retention 0: the calls of this node whose jobs were deleted at once (a re-sent call finds
-- its own id here); looked up at most once per call.
local acked_key = qprefix .. 'acked:' .. node
local repeated = nil
-- Lease removals and finished-index entries are written with one command each, after the loop.
local unlease, finished_add = {}, {}
for i = 1, n do
  local id, attempt, result = ARGV[5 + 3 * i], ARGV[6 + 3 * i], ARGV[7 + 3 * i]
  local jkey = qprefix .. 'job:' .. id
  local ok, f = pcall(rcall, 'HMGET', jkey, 'attempts', 'finished_by', 'unique', 'state', 'task')
  if not ok or not f[4] then
    -- No job hash: deleted at once by this very call's earlier send (retention 0), or gone.
    if repeated == nil then
      repeated = call_id ~= '' and rcall('ZSCORE', acked_key, call_id) ~= false
    end
    if repeated then
      codes[i] = 0
    else
      if rcall('ZREM', active_key, id) == 1 then unlease[#unlease + 1] = id end
      codes[i] = -1
    end
  else
    if attempt == '' then attempt = f[1] or '0' end -- never claimed: no attempts field
    local mine = node .. ':' .. attempt
    if f[2] == mine and f[4] == 'done' then
      -- This attempt finished the job already: a repeated call, not a new completion.
      codes[i] = 0
    elseif tonumber(f[1]) ~= tonumber(attempt) or rcall('ZREM', active_key, id) == 0 then
      -- The per-attempt fence: another attempt holds the job now (its lease was reaped, and it
      -- may have been claimed again, by this node too), or this node does not hold it.
      codes[i] = -2
    else
      unlease[#unlease + 1] = id
      release_unique(qprefix, id, f[3])
      emit('done', id, now, 'task', f[5] or '', 'attempt', attempt)
      -- Completion notice, only for a job a caller waits on (jobq.Job.result marks it): the id,
      -- and a small result inline ("<id> d<result>"), so the caller needs no read to have it.
      if rcall('EXISTS', qprefix .. 'wait:' .. id) == 1 then
        rcall('PUBLISH', qprefix .. 'done', #result <= 1024 and (id .. ' d' .. result) or id)
      end
      if retention > 0 then
        -- 'node' and 'finished_by' stay on a finished job so a repeated ack is told apart.
        if result ~= '' then
          rcall('HSET', jkey, 'state', 'done', 'finished_ms', now_s, 'finished_by', mine, 'result', result)
        else
          rcall('HSET', jkey, 'state', 'done', 'finished_ms', now_s, 'finished_by', mine)
        end
        rcall('PEXPIRE', jkey, ARGV[4]) -- retention_ms, canonical (int_arg)
        finished_add[#finished_add + 1] = expire_at; finished_add[#finished_add + 1] = id
        n_finished = n_finished + 1
      else
        rcall('DEL', jkey)
        n_deleted = n_deleted + 1
      end
      codes[i] = 1
    end
  end
end

if #unlease > 0 then rcall('ZREM', leases_key, unpack(unlease)) end
if n_finished > 0 then
  rcall('ZADD', finished_key, unpack(finished_add))
  -- The index lives as long as its newest entry; drop entries whose hash has expired (bounded).
  if rcall('PTTL', finished_key) < retention then rcall('PEXPIRE', finished_key, retention) end
  local gone = rcall('ZRANGEBYSCORE', finished_key, '-inf', now, 'LIMIT', 0, n + 10)
  if #gone > 0 then rcall('ZREM', finished_key, unpack(gone)) end
  -- The count bound: past finished_max, the jobs that expire first go now, with their hashes
  -- (unless the id names a newer job since: same_incarnation in lib/common.lua).
  local excess = finished_max > 0 and rcall('ZCARD', finished_key) - finished_max or 0
  if excess > 0 then
    local old = rcall('ZRANGE', finished_key, 0, math.min(excess, n + 100) - 1, 'WITHSCORES')
    local drop = {}
    for i = 1, #old, 2 do
      local jkey = qprefix .. 'job:' .. old[i]
      if same_incarnation(jkey, old[i + 1], FINISHED_STATES, false) then rcall('DEL', jkey) end
      drop[#drop + 1] = old[i]
    end
    rcall('ZREM', finished_key, unpack(drop))
  end
end
if n_deleted > 0 and call_id ~= '' then
  -- Remember this call (its jobs left no hash to tell a re-send by): the node's last 64 calls,
  -- for 60 s (longer than a client's re-sends: 3 tries of a 10 s socket timeout).
  rcall('ZADD', acked_key, now, call_id)
  rcall('ZREMRANGEBYRANK', acked_key, 0, -65)
  rcall('PEXPIRE', acked_key, 60000)
end
return codes
