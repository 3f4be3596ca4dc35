#!lua flags=allow-oom
--[[
  claim: lease up to N runnable jobs of one queue to one node. Due scheduled jobs are promoted
  to ready first; then the best jobs are popped from ready (highest priority, FIFO within a
  priority), added to the node's active set, leased until now + lease_ms, and their attempt is
  counted; the job hash gets state active, node, started_ms, attempts and its ready score. A job
  whose deadline has passed is dead-lettered with reason "expired" instead of being claimed; so
  are ids with a missing or foreign-typed job key. A paused queue claims nothing. Allowed under
  OOM, so a full Redis can still drain its backlog.

  KEYS[1]  ready      ZSET    jobq:{q}:ready
  KEYS[2]  scheduled  ZSET    jobq:{q}:scheduled
  KEYS[3]  active     ZSET    jobq:{q}:active:<node>  member = job id, score = claim time ms
  KEYS[4]  leases     ZSET    jobq:{q}:leases         member = job id, score = lease deadline ms
  KEYS[5]  dead       ZSET    jobq:{q}:dead
  KEYS[6]  paused     STRING  jobq:{q}:paused
  KEYS[7]  seq        STRING  jobq:{q}:seq
  KEYS[8]  events     STREAM  jobq:{q}:events       "started" per claimed job, "dead", "promoted"
  KEYS[9]  guard      NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>.

  ARGV[1]  qprefix        "jobq:{q}:"
  ARGV[2]  node           the claiming node's id; KEYS[3] must be its active set
  ARGV[3]  now_ms         integer ms, or "" for the Redis server clock
  ARGV[4]  lease_ms       integer > 0
  ARGV[5]  max_jobs       integer 0..500; fewer when their payloads would pass 2 MiB in all
  ARGV[6]  promote_limit  integer 0..100, due scheduled jobs promoted per call
  ARGV[7]  dead_max       integer >= 1, dead-letter list size bound
  ARGV[8]  dead_ttl_ms    integer >= 1, dead-letter age bound
  ARGV[9]  events_max     integer >= 0, the events stream's length cap (0 = no events)

  Returns: {now_ms, next_due_ms (-1 = none; now_ms when jobs were left for the byte bound),
            n_claimed, n_dead,
            n_claimed x (id, task, payload, attempts, max_attempts, timeout_ms, ready_ms,
                         deadline_ms (0 = none), tp (the producer's trace context, "" = none)),
            n_dead x (id, reason), dead_trimmed}; dead_trimmed = dead letters deleted because
           the list was over dead_max (absent when the queue is paused).
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O((max_jobs + promote_limit) * log N); per claimed job one HMGET and one HSET.
]]
local ready_key, sched_key, active_key, leases_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local dead_key, paused_key, seq_key = KEYS[5], KEYS[6], KEYS[7]
local qprefix, node = ARGV[1], ARGV[2]

local e = bad_counts(9, 9) or bad_qprefix(qprefix) or bad_node(node) or bad_events(qprefix)
if e then return e end
if active_key ~= qprefix .. 'active:' .. node then return badarg('node', 'does not match KEYS[3]') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local now_s = fmt_int(now)
local lease = int_arg(ARGV[4])
if lease == nil or lease <= 0 then return badarg('lease_ms', 'must be an integer > 0') end
local max_jobs = int_arg(ARGV[5])
if max_jobs == nil or max_jobs < 0 or max_jobs > 500 then return badarg('max_jobs', 'must be 0..500') end
local promote_limit = int_arg(ARGV[6])
if promote_limit == nil or promote_limit < 0 or promote_limit > 100 then
  return badarg('promote_limit', 'must be 0..100')
end
local dead_max = int_arg(ARGV[7])
if dead_max == nil or dead_max < 1 then return badarg('dead_max', 'must be >= 1') end
local dead_ttl = int_arg(ARGV[8])
if dead_ttl == nil or dead_ttl < 1 then return badarg('dead_ttl_ms', 'must be >= 1') end

-- A paused queue keeps its jobs where they are.
if rcall('EXISTS', paused_key) == 1 then
  return {now, next_due(sched_key), 0, 0}
end

-- Promote due scheduled jobs (bounded), each behind the ready jobs of its priority.
promote_due(qprefix, sched_key, ready_key, seq_key, now, promote_limit)

local claimed, dead = {}, {}
-- The active-set entries and the leases are written with one command each, after the loop.
local push, lease_add = {}, {}
local over = nil -- where the byte budget stopped the claim (see below)
if max_jobs > 0 then
  local popped = rcall('ZPOPMIN', ready_key, max_jobs)
  -- Payload bytes claimed so far; a job that would pass MAX_BATCH_BYTES (after a first one) and
  -- the rest of the popped ones go back to ready in their places, for the next call.
  local bytes = 0
  for i = 1, #popped, 2 do
    local id = popped[i]
    local jkey = qprefix .. 'job:' .. id
    local ok, f = pcall(rcall, 'HMGET', jkey, 'task', 'payload', 'attempts', 'max_attempts',
      'timeout_ms', 'ready_ms', 'deadline_ms', 'parts', 'enqueued_ms', 'tp')
    if not ok then
      -- A key of another type sits at the job's name: nothing runnable, and never overwritten.
      dead[#dead + 1] = id; dead[#dead + 1] = 'wrong_type'
      to_dead(qprefix, dead_key, id, 'wrong_type', now, dead_max, dead_ttl)
    elseif not f[1] then
      dead[#dead + 1] = id; dead[#dead + 1] = 'missing_job'
      to_dead(qprefix, dead_key, id, 'missing_job', now, dead_max, dead_ttl)
    elseif f[7] and (tonumber(f[7]) or 0) > 0 and now > tonumber(f[7]) then
      -- Not started before its deadline: never run.
      dead[#dead + 1] = id; dead[#dead + 1] = 'expired'
      to_dead(qprefix, dead_key, id, 'expired', now, dead_max, dead_ttl)
    else
      f[2] = read_payload(jkey, f[2], f[8])
      bytes = bytes + #f[2]
      if #claimed > 0 and bytes > MAX_BATCH_BYTES then
        over = i
        break
      end
      -- The attempt is counted from the value just read (one HSET, no HINCRBY); the ready score
      -- is kept on the job so reap and release can put it back in its old place.
      local attempts = (tonumber(f[3]) or 0) + 1
      rcall('HSET', jkey, 'attempts', attempts, 'state', 'active', 'node', node,
        'started_ms', now_s, 'score', popped[i + 1])
      emit('started', id, now, 'task', f[1], 'attempt', attempts, 'node', node)
      push[#push + 1] = now; push[#push + 1] = id
      lease_add[#lease_add + 1] = now + lease; lease_add[#lease_add + 1] = id
      local c = #claimed
      claimed[c + 1] = id; claimed[c + 2] = f[1]; claimed[c + 3] = f[2]
      claimed[c + 4] = attempts; claimed[c + 5] = f[4] or '1'; claimed[c + 6] = f[5] or '0'
      -- No ready_ms: ready since its enqueue.
      claimed[c + 7] = f[6] or f[9] or now_s; claimed[c + 8] = f[7] or '0'
      claimed[c + 9] = f[10] or ''
    end
  end
  if over then
    local back = {}
    for k = over, #popped, 2 do back[#back + 1] = popped[k + 1]; back[#back + 1] = popped[k] end
    rcall('ZADD', ready_key, unpack(back))
  end
end

if #push > 0 then
  rcall('ZADD', active_key, unpack(push))
  rcall('ZADD', leases_key, unpack(lease_add))
end

-- Jobs left in ready for the byte budget are due now: the caller claims again at once.
local due = next_due(sched_key)
if over and (due < 0 or due > now) then due = now end
local out = {now, due, #claimed / 9, #dead / 2}
for _, v in ipairs(claimed) do out[#out + 1] = v end
for _, v in ipairs(dead) do out[#out + 1] = v end
out[#out + 1] = dead_trimmed
return out
