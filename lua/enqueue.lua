#!lua
--[[
  enqueue: store one or more jobs of one queue and make each runnable (ready) or delayed
  (scheduled), atomically. Every argument of every job is validated, and every key read, before
  the first write, so a refused batch (or one whose read fails) writes nothing. A job id that
  already exists is a no-op that returns that id (a retried enqueue is never a duplicate); a
  unique key held by a live job returns the holder's id.
  Optionally guarded by a cron tick, so a periodic entry fires exactly once per tick.

  KEYS[1]  ready      ZSET    jobq:{q}:ready        score = (100 - priority) * 2^44 + seq
  KEYS[2]  scheduled  ZSET    jobq:{q}:scheduled    score = run-at, ms
  KEYS[3]  seq        STRING  jobq:{q}:seq          FIFO sequence counter
  KEYS[4]  events     STREAM  jobq:{q}:events       lifecycle events: "enqueued" per new job
  KEYS[5]  guard      NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag (same slot): jobq:{q}:job:<id> (HASH),
  jobq:{q}:unique:<key> (STRING), jobq:{q}:cron:<name> (STRING), jobq:{q}:idle (ZSET, idle
  nodes' tokens); shard channels jobq:{q}:wake:<node>.

  ARGV[1]  qprefix    the queue's key prefix, "jobq:{q}:"
  ARGV[2]  now_ms     integer ms, or "" for the Redis server clock (TIME)
  ARGV[3]  max_depth  refuse the batch when ready + scheduled + n > max_depth; 0 = no limit
  ARGV[4]  cron_name  "" or the periodic entry's name (no spaces, braces)
  ARGV[5]  cron_tick  integer >= 0, the tick (ms) being fired; ignored without cron_name
  ARGV[6]  n          number of jobs that follow, 1..500; more than one carry at most 2 MiB
                      of payloads in all
  then 11 fields per job, or 12 when the call carries trace contexts:
    id            1..128 bytes, no whitespace
    task          the task name
    payload       msgpack bytes (opaque here)
    priority      integer -100..100 (higher runs first)
    delay_ms      integer >= 0, or ""          run at now + delay
    run_at_ms     integer >= 0, or ""          run at this time (past = now); wins over delay
    max_attempts  integer 1..1000000
    timeout_ms    integer >= 0 (0 = none)
    backoff_ms    integer >= 0, retry backoff base
    deadline      "" = none, an integer ms (absolute), or "+<ms>" (relative to now); a job
                  not started by then is dead-lettered as "expired"; must not be before the
                  run time
    unique_key    "" or 1..512 bytes, no control characters
    trace         (12th, optional) "" or the producer's trace context (jobq[otel]): a W3C
                  traceparent, then a space and the tracestate if any; at most 600 bytes, no
                  control characters; stored as field tp. A call sends 12 fields only when at
                  least one of its jobs carries a trace.
  then, last:
  ARGV[7 + 11n]  events_max  integer >= 0, the events stream's length cap (0 = no events);
                 (7 + 12n with the trace field)

  Job hash fields written: task, payload (in parts when longer than 64 bytes: put_payload),
  priority, max_attempts, timeout_ms, enqueued_ms, state, and run_at_ms for a scheduled job;
  backoff_ms only when it is not fail's default of 1000 (0 included: no backoff), deadline_ms,
  unique and tp only when set. Fields a reader derives are left out, as each costs bytes in every queued
  job: attempts (absent = 0, claim counts the first), and for a job ready at once run_at_ms and
  ready_ms (absent = enqueued_ms; jobs stored by earlier versions have them, equal to it). The
  ready score is not stored here: claim records it when it pops the job (reap and release read
  it there).

  Wake-up (lib/common.lua wake_idle): one idle node per new ready job is told "r" on its own
  channel jobq:{q}:wake:<node> (nodes that found the queue empty hold a token in jobq:{q}:idle);
  else "s" to one idle node when a new scheduled job runs before every job already scheduled (a
  waiting node sleeps until the earliest run time it saw, or its poll interval). Nothing is sent
  when no node is idle.

  Returns: an array with one id per job (the new id, or the id of the job already holding it);
           an empty array when the cron tick already fired; {-5, depth} when the queue is full.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(n log N); per new ready job EXISTS + HSET (+ GET/SET with a unique key), then per call
           TIME, INCRBY, EXISTS, ZADD, and one ZPOPMIN + SPUBLISH per idle node woken.
]]
local ready_key, sched_key, seq_key = KEYS[1], KEYS[2], KEYS[3]
local qprefix = ARGV[1]
local NFIELDS = 11 -- 12 with the optional trace field (decided by the ARGV count below)

if #KEYS ~= 5 then return badarg('keys', 'expected 5 keys') end
local e = bad_qprefix(qprefix); if e then return e end
local now = now_ms(ARGV[2])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local now_s = fmt_int(now)
local max_depth = int_arg(ARGV[3])
if max_depth == nil or max_depth < 0 then return badarg('max_depth', 'not a non-negative integer') end
local cron_name = ARGV[4]
if cron_name == nil or #cron_name > 200 or string.find(cron_name, '[%s%c{}]') then
  return badarg('cron_name', 'invalid cron entry name')
end
local cron_tick = int_arg(ARGV[5])
if cron_tick == nil or cron_tick < 0 then return badarg('cron_tick', 'not a non-negative integer') end
local n = int_arg(ARGV[6])
if n == nil or n < 1 or n > 500 then return badarg('n', 'must be 1..500') end
if #ARGV == 7 + n * 12 then NFIELDS = 12 end
-- version "-" trace-id "-" parent-id "-" flags, as hex digits (W3C Trace Context)
local TRACEPARENT = '^%x%x%-' .. string.rep('%x', 32) .. '%-' .. string.rep('%x', 16) .. '%-%x%x'
local traced = false
if #ARGV ~= 7 + n * NFIELDS then return badarg('argv', 'expected ' .. (7 + n * NFIELDS) .. ' values') end
e = bad_events(qprefix); if e then return e end

-- The payload goes into the hash in parts of at most PAYLOAD_PART bytes when it is longer (up
-- to PAYLOAD_PARTS_MAX parts): a hash whose every value is at most 64 bytes keeps Redis's compact
-- listpack encoding (hash-max-listpack-value, default 64), where one longer value makes the whole
-- hash a hashtable at about 2.5 times the memory. "payload" holds the first part, "p2" .. "p<k>"
-- the others (short names: each costs bytes in every job), and "parts" = k (absent for a payload
-- stored whole). A longer payload is stored whole: its own bytes outweigh the hash's encoding.
local function put_payload(fields, p)
  local len = #p
  local nf = #fields
  if len <= PAYLOAD_PART or len > PAYLOAD_PART * PAYLOAD_PARTS_MAX then
    fields[nf + 1] = 'payload'; fields[nf + 2] = p
    return
  end
  local k = math.ceil(len / PAYLOAD_PART)
  fields[nf + 1] = 'parts'; fields[nf + 2] = k
  fields[nf + 3] = 'payload'; fields[nf + 4] = string.sub(p, 1, PAYLOAD_PART)
  nf = nf + 4
  for part = 2, k do
    fields[nf + 1] = 'p' .. part
    fields[nf + 2] = string.sub(p, (part - 1) * PAYLOAD_PART + 1, part * PAYLOAD_PART)
    nf = nf + 2
  end
end

-- Validate every job before the first write: Redis never rolls a script back.
local jobs = {}
local b_of = {} -- each job's ARGV offset
-- The jobs of a batch usually share their options: each distinct integer text is parsed once.
local memo = {}
local function int_memo(v)
  local x = memo[v]
  if x == nil then
    x = int_arg(v) or false
    memo[v] = x
  end
  return x or nil
end
local last_task = nil -- a batch usually repeats one task name: check each distinct run once
local bytes = 0
for i = 1, n do
  local b = 6 + (i - 1) * NFIELDS
  -- Integers are validated in canonical form (int_arg), so their ARGV text is stored as given.
  local j = {
    id = ARGV[b + 1], task = ARGV[b + 2], payload = ARGV[b + 3],
    prio = int_memo(ARGV[b + 4]), max_attempts = int_memo(ARGV[b + 7]),
    timeout = int_memo(ARGV[b + 8]), backoff = int_memo(ARGV[b + 9]),
    unique = ARGV[b + 11], prio_s = ARGV[b + 4], trace = NFIELDS == 12 and ARGV[b + 12] or '',
  }
  e = bad_id(j.id); if e then return e end
  bytes = bytes + #j.payload
  if i > 1 and bytes > MAX_BATCH_BYTES then return badarg('n', 'payloads over 2 MiB: split the batch') end
  if j.task ~= last_task then
    if j.task == '' or #j.task > 200 or string.find(j.task, '[%s%c]') then
      return badarg('task', 'invalid task name')
    end
    last_task = j.task
  end
  if j.prio == nil or j.prio < -100 or j.prio > 100 then
    return badarg('priority', 'must be an integer -100..100')
  end
  if j.max_attempts == nil or j.max_attempts < 1 or j.max_attempts > 1000000 then
    return badarg('max_attempts', 'must be an integer 1..1000000')
  end
  if j.timeout == nil or j.timeout < 0 then return badarg('timeout', 'must be an integer ms >= 0') end
  if j.backoff == nil or j.backoff < 0 then return badarg('retry_backoff', 'must be an integer ms >= 0') end
  if #j.unique > 512 or string.find(j.unique, '%c') then
    return badarg('unique_key', 'longer than 512 bytes or has control characters')
  end
  if j.trace ~= '' then
    if #j.trace > 600 or string.find(j.trace, '%c') or not string.find(j.trace, TRACEPARENT) then
      return badarg('trace', 'not a W3C traceparent (and tracestate) of at most 600 bytes')
    end
    traced = true
  end
  -- Run time: an explicit run_at wins; a past run_at means now.
  local run_at = now
  local at_arg, delay_arg = ARGV[b + 6], ARGV[b + 5]
  if at_arg ~= '' then
    local at = int_arg(at_arg)
    if at == nil or at < 0 then return badarg('run_at', 'must be an integer ms >= 0') end
    if at > now then run_at = at end
  elseif delay_arg ~= '' then
    local d = int_arg(delay_arg)
    if d == nil or d < 0 or now + d > MAX_INT then return badarg('delay', 'must be an integer ms >= 0') end
    run_at = now + d
  end
  local dl = ARGV[b + 10]
  if dl == '' then
    j.deadline = 0
  elseif string.sub(dl, 1, 1) == '+' then
    local rel = int_arg(string.sub(dl, 2))
    if rel == nil or rel < 0 or now + rel > MAX_INT then return badarg('deadline', 'must be +<integer ms>') end
    j.deadline = now + rel
  else
    j.deadline = int_arg(dl)
    if j.deadline == nil or j.deadline < 0 then return badarg('deadline', 'must be an integer ms >= 0') end
  end
  if j.deadline > 0 and j.deadline < run_at then
    return badarg('deadline', 'is before the run time')
  end
  j.run_at = run_at
  jobs[i] = j
  b_of[i] = b
end

if NFIELDS == 12 and not traced then return badarg('argv', 'a 12th field (trace) but no job has one') end

-- A cron tick fires once: only a tick newer than the last one recorded enqueues.
local ckey = nil
if cron_name ~= '' then
  ckey = qprefix .. 'cron:' .. cron_name
  local last = tonumber(rcall('GET', ckey) or '-1')
  if last ~= nil and cron_tick <= last then return {} end
end

-- Back-pressure: refuse the whole batch when the queue is at its maximum depth.
local n_was_ready = nil
if max_depth > 0 then
  n_was_ready = rcall('ZCARD', ready_key)
  local depth = n_was_ready + rcall('ZCARD', sched_key)
  if depth + n > max_depth then return {-5, depth} end
end

-- Every read before the first write, so a read that fails (a key of another type at a unique
-- key's name, a key of a Redis Cluster slot half moved to another node) leaves nothing half
-- written: a retry of the batch must not find job hashes that never reached ready.
local exists, held = {}, {}
for i = 1, n do
  local j = jobs[i]
  exists[i] = rcall('EXISTS', qprefix .. 'job:' .. j.id) == 1
  if not exists[i] and j.unique ~= '' then
    -- The key is held while its job is unfinished; ack, dead-lettering, cancel and purge free it.
    local holder = rcall('GET', qprefix .. 'unique:' .. j.unique)
    -- A key whose holder's hash is gone (deleted or evicted from outside jobq) is stale: take it.
    if holder and rcall('EXISTS', qprefix .. 'job:' .. holder) == 0 then holder = nil end
    held[i] = holder
  end
end

if ckey then rcall('SET', ckey, fmt_int(cron_tick)) end
local ids = {}
local n_ready, n_sched = 0, 0
local seq = nil
local sched_min = nil
-- Members for one ZADD per set at the end (score, id, score, id, ...).
local ready_add, sched_add = {}, {}
-- Ids and unique keys taken by earlier jobs of this batch.
local written, taken = {}, {}
for i = 1, n do
  local j = jobs[i]
  local jkey = qprefix .. 'job:' .. j.id
  local holder = nil
  if exists[i] or written[j.id] then
    holder = j.id -- idempotent retry of an enqueue that already happened
  elseif j.unique ~= '' then
    holder = held[i] or taken[j.unique]
    if not holder then
      rcall('SET', qprefix .. 'unique:' .. j.unique, j.id)
      taken[j.unique] = j.id
    end
  end
  if holder then
    ids[i] = holder
  else
    ids[i] = j.id
    written[j.id] = true
    local fields = {
      'task', j.task, 'priority', j.prio_s,
      'max_attempts', ARGV[b_of[i] + 7], 'timeout_ms', ARGV[b_of[i] + 8], 'enqueued_ms', now_s,
    }
    put_payload(fields, j.payload)
    -- fail.lua's default base is 1000 ms; any other value (0 = retry at once) is kept.
    if j.backoff ~= 1000 then fields[#fields + 1] = 'backoff_ms'; fields[#fields + 1] = ARGV[b_of[i] + 9] end
    if j.deadline > 0 then
      fields[#fields + 1] = 'deadline_ms'; fields[#fields + 1] = fmt_int(j.deadline)
    end
    if j.unique ~= '' then fields[#fields + 1] = 'unique'; fields[#fields + 1] = j.unique end
    if j.trace ~= '' then fields[#fields + 1] = 'tp'; fields[#fields + 1] = j.trace end
    if j.run_at > now then
      local at = fmt_int(j.run_at)
      fields[#fields + 1] = 'run_at_ms'; fields[#fields + 1] = at
      fields[#fields + 1] = 'state'; fields[#fields + 1] = 'scheduled'
      rcall('HSET', jkey, unpack(fields))
      emit('enqueued', j.id, now, 'task', j.task, 'run_at', at)
      sched_add[#sched_add + 1] = at; sched_add[#sched_add + 1] = j.id
      n_sched = n_sched + 1
      if sched_min == nil or j.run_at < sched_min then sched_min = j.run_at end
    else
      -- One INCRBY reserves sequence numbers for the whole batch, in order (FIFO).
      if seq == nil then seq = rcall('INCRBY', seq_key, n) - n end
      seq = seq + 1
      fields[#fields + 1] = 'state'; fields[#fields + 1] = 'ready'
      rcall('HSET', jkey, unpack(fields))
      emit('enqueued', j.id, now, 'task', j.task)
      ready_add[#ready_add + 1] = ready_score(j.prio, seq); ready_add[#ready_add + 1] = j.id
      n_ready = n_ready + 1
    end
  end
end

-- Wake one idle node per new ready job, or one for a scheduled job earlier than all others.
local wake, n_wake = nil, 1
if n_ready > 0 then
  wake, n_wake = 'r', n_ready
  rcall('ZADD', ready_key, unpack(ready_add))
end
if n_sched > 0 then
  local first = next_due(sched_key)
  if wake == nil and (first < 0 or sched_min < first) then wake = 's' end
  rcall('ZADD', sched_key, unpack(sched_add))
end
if wake then wake_idle(qprefix, n_wake, wake) end
return ids
