#!lua flags=allow-oom
--[[
  fail: record a failed attempt of a job one node ran. Fenced per attempt like ack: refused
  unless the attempt named is the job's current one and the job is in this node's active list;
  a repeated call of an attempt whose failure is already recorded ("finished_by" = node:attempt
  on the job) changes nothing and answers what the first call did, flagged as a repeat. The job
  is retried (scheduled after a delay: the one given, or exponential backoff with jitter from its
  retry_backoff base) while attempts remain, else it moves to the dead-letter list with its last
  error. mode "dead" dead-letters at once (jobq.Fail, decode errors). Allowed under OOM.

  KEYS[1]  active     ZSET    jobq:{q}:active:<node>
  KEYS[2]  leases     ZSET    jobq:{q}:leases
  KEYS[3]  scheduled  ZSET    jobq:{q}:scheduled
  KEYS[4]  dead       ZSET    jobq:{q}:dead
  KEYS[5]  ready      ZSET    jobq:{q}:ready
  KEYS[6]  seq        STRING  jobq:{q}:seq
  KEYS[7]  events     STREAM  jobq:{q}:events       "retried" or "dead" (lib/common.lua emit)
  KEYS[8]  guard      NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>,
  jobq:{q}:wait:<id> (STRING, read only: set by a caller waiting for the result). A dead-lettered
  job whose wait key exists has its id published on the channel jobq:{q}:done. A job made ready
  again pops an idle node's token from jobq:{q}:idle and wakes it on jobq:{q}:wake:<node>
  (lib/common.lua wake_idle).

  ARGV[1]  qprefix         "jobq:{q}:"
  ARGV[2]  node            the failing node's id; KEYS[1] must be its active set
  ARGV[3]  now_ms          integer ms, or "" for the Redis server clock
  ARGV[4]  id              the job id
  ARGV[5]  error           the error text kept on the job
  ARGV[6]  mode            "retry" (retry policy) or "dead" (no retry)
  ARGV[7]  delay_ms        "" = backoff policy, else an integer >= 0 (jobq.Retry(delay=...))
  ARGV[8]  jitter          a number 0..1; the backoff delay is d * (0.75 + 0.5 * jitter)
  ARGV[9]  backoff_cap_ms  integer >= 0, upper bound of a backoff delay
  ARGV[10] dead_max        integer >= 1
  ARGV[11] dead_ttl_ms     integer >= 1
  ARGV[12] attempt         the attempt number the claim returned; "" = the attempt this node holds
  ARGV[13] count_reap      "1": a retry scheduled here also counts a reap on the job (HINCRBY
                           reaped 1: a node recovering the jobs an earlier run of it left), "" not
  ARGV[14] events_max      integer >= 0, the events stream's length cap (0 = no events)

  Returns: {code, run_at_ms, repeated, dead_trimmed}: code 1 retry scheduled (at run_at_ms),
           2 dead-lettered, -2 refused: the job is not this attempt's (stale completion),
           -1 no such job (the id was in the active set but its hash is gone: dead-lettered);
           repeated = 1 when this attempt's failure was already recorded by an earlier send of
           the call (code then tells what that send did); dead_trimmed = dead letters deleted
           because the list was over dead_max.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(log N).
]]
local active_key, leases_key, sched_key = KEYS[1], KEYS[2], KEYS[3]
local dead_key, ready_key, seq_key = KEYS[4], KEYS[5], KEYS[6]
local qprefix, node, id, err, mode = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]

local e = bad_counts(8, 14) or bad_qprefix(qprefix) or bad_node(node) or bad_id(id) or bad_events(qprefix)
if e then return e end
if active_key ~= qprefix .. 'active:' .. node then return badarg('node', 'does not match KEYS[1]') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
if mode ~= 'retry' and mode ~= 'dead' then return badarg('mode', 'must be retry or dead') end
local delay = nil
if ARGV[7] ~= '' then
  delay = int_arg(ARGV[7])
  if delay == nil or delay < 0 or now + delay > MAX_INT then
    return badarg('delay_ms', 'must be an integer >= 0')
  end
end
local jitter = tonumber(ARGV[8])
if jitter == nil or jitter ~= jitter or jitter < 0 or jitter > 1 then return badarg('jitter', 'must be 0..1') end
local cap = int_arg(ARGV[9])
if cap == nil or cap < 0 then return badarg('backoff_cap_ms', 'must be >= 0') end
local dead_max = int_arg(ARGV[10])
if dead_max == nil or dead_max < 1 then return badarg('dead_max', 'must be >= 1') end
local dead_ttl = int_arg(ARGV[11])
if dead_ttl == nil or dead_ttl < 1 then return badarg('dead_ttl_ms', 'must be >= 1') end
if ARGV[13] ~= '' and ARGV[13] ~= '1' then return badarg('count_reap', 'must be 1 or empty') end
local count_reap = ARGV[13] == '1'
local attempt = ARGV[12]
if attempt ~= '' then
  local a = int_arg(attempt)
  if a == nil or a < 1 then return badarg('attempt', 'must be an integer >= 1 or empty') end
end

local jkey = qprefix .. 'job:' .. id
local ok, f = pcall(rcall, 'HMGET', jkey, 'attempts', 'max_attempts', 'backoff_ms', 'priority',
  'finished_by', 'state', 'run_at_ms', 'task')
if not ok or not f[6] then
  -- No usable job hash: if this node holds the id, dead-letter it so it is seen.
  if rcall('ZREM', active_key, id) == 0 then return {-2, 0, 0, 0} end
  rcall('ZREM', leases_key, id)
  to_dead(qprefix, dead_key, id, ok and 'missing_job' or 'wrong_type', now, dead_max, dead_ttl)
  return {-1, 0, 0, dead_trimmed}
end
if attempt == '' then attempt = f[1] or '0' end -- never claimed: no attempts field
local mine = node .. ':' .. attempt
if f[5] == mine and f[6] ~= 'done' then
  -- This attempt's failure is recorded already: a repeated call changes nothing.
  if f[6] == 'dead' then return {2, 0, 1, 0} end
  return {1, tonumber(f[7] or '') or now, 1, 0}
end
-- The per-attempt fence: only the attempt that holds the job, on the node that holds it.
if tonumber(f[1]) ~= tonumber(attempt) or rcall('ZREM', active_key, id) == 0 then
  return {-2, 0, 0, 0}
end
rcall('ZREM', leases_key, id)
local attempts = tonumber(f[1]) or 1
local max_attempts = tonumber(f[2]) or 1

if mode == 'dead' or attempts >= max_attempts then
  -- Attempts exhausted (or no retry wanted): dead-letter with the last error.
  rcall('HSET', jkey, 'finished_by', mine)
  to_dead(qprefix, dead_key, id, err, now, dead_max, dead_ttl)
  -- Completion notice, only for a job a caller waits on (jobq.Job.result marks it).
  if rcall('EXISTS', qprefix .. 'wait:' .. id) == 1 then rcall('PUBLISH', qprefix .. 'done', id) end
  return {2, 0, 0, dead_trimmed}
end

if delay == nil then
  -- Exponential backoff from the job's base (default 1 s), capped, +/-25% jitter.
  local base = tonumber(f[3] or '1000') or 1000
  local d = math.min(cap, base * math.pow(2, math.min(attempts - 1, 60)))
  delay = math.floor(d * (0.75 + 0.5 * jitter))
end

if delay == 0 then
  -- Retry at once: back to ready, behind the jobs of its priority.
  local score = ready_score(tonumber(f[4] or '0') or 0, rcall('INCR', seq_key))
  rcall('HSET', jkey, 'state', 'ready', 'error', err, 'ready_ms', now, 'score', score, 'finished_by', mine)
  rcall('HDEL', jkey, 'node')
  if count_reap then rcall('HINCRBY', jkey, 'reaped', 1) end
  rcall('ZADD', ready_key, score, id)
  emit('retried', id, now, 'task', f[8] or '', 'attempt', attempt, 'error', string.sub(err, 1, 200),
    'run_at', fmt_int(now))
  wake_idle(qprefix, 1, 'r')
  return {1, now, 0, 0}
end
local run_at = fmt_int(now + delay)
rcall('HSET', jkey, 'state', 'scheduled', 'error', err, 'run_at_ms', run_at, 'finished_by', mine)
rcall('HDEL', jkey, 'node')
if count_reap then rcall('HINCRBY', jkey, 'reaped', 1) end
rcall('ZADD', sched_key, run_at, id)
emit('retried', id, now, 'task', f[8] or '', 'attempt', attempt, 'error', string.sub(err, 1, 200),
  'run_at', run_at)
wake_idle(qprefix, 1, 's')
return {1, now + delay, 0, 0}
