#!lua flags=allow-oom
--[[
  fail: record a failed attempt of a job one node ran. Fenced by ownership like ack. The job is
  retried (scheduled after a delay: the one given, or exponential backoff with jitter from its
  retry_backoff base) while attempts remain, else it moves to the dead-letter list with its last
  error. mode "dead" dead-letters at once (jobq.Fail, decode errors). Allowed under OOM.

  KEYS[1]  active     LIST    jobq:{q}:active:<node>
  KEYS[2]  leases     ZSET    jobq:{q}:leases
  KEYS[3]  scheduled  ZSET    jobq:{q}:scheduled
  KEYS[4]  dead       ZSET    jobq:{q}:dead
  KEYS[5]  ready      ZSET    jobq:{q}:ready
  KEYS[6]  seq        STRING  jobq:{q}:seq
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>.

  ARGV[1]  qprefix         "jobq:{q}:"
  ARGV[2]  node            the failing node's id
  ARGV[3]  now_ms          integer ms, or "" for the Redis server clock
  ARGV[4]  id              the job id
  ARGV[5]  error           the error text kept on the job
  ARGV[6]  mode            "retry" (retry policy) or "dead" (no retry)
  ARGV[7]  delay_ms        "" = backoff policy, else an integer >= 0 (jobq.Retry(delay=...))
  ARGV[8]  jitter          a number 0..1; the backoff delay is d * (0.75 + 0.5 * jitter)
  ARGV[9]  backoff_cap_ms  integer >= 0, upper bound of a backoff delay
  ARGV[10] dead_max        integer >= 1
  ARGV[11] dead_ttl_ms     integer >= 1

  Returns: {1, run_at_ms} retry scheduled, {2, 0} dead-lettered, {-2, 0} lease lost (refused),
           {-1, 0} no such job (the id was in the active list but its hash is gone: removed).
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(A + log N), A = the node's active list length.
]]
local rcall = redis.call
local active_key, leases_key, sched_key = KEYS[1], KEYS[2], KEYS[3]
local dead_key, ready_key, seq_key = KEYS[4], KEYS[5], KEYS[6]
local qprefix, node, id, err, mode = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]
local PRIO_SPAN = 17592186044416 -- 2^44

local function badarg(field, why)
  return redis.error_reply('BADARG ' .. field .. ' ' .. why)
end

local function int_arg(v)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n ~= n or n == math.huge or n == -math.huge then
    return nil
  end
  return n
end

local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return int_arg(arg) end
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ready_score(prio, seq)
  return string.format('%.0f', (100 - prio) * PRIO_SPAN + seq)
end

-- Move a job to the dead-letter list, release its unique key, and keep the list bounded by
-- count and age (deleting the hashes of the jobs trimmed away). Shared by claim, fail and reap.
local function to_dead(id, reason, now, dead_max, dead_ttl)
  local jkey = qprefix .. 'job:' .. id
  if rcall('TYPE', jkey)['ok'] == 'hash' then
    local unique = rcall('HGET', jkey, 'unique')
    if unique then
      local ukey = qprefix .. 'unique:' .. unique
      if rcall('GET', ukey) == id then rcall('DEL', ukey) end
    end
    rcall('HSET', jkey, 'state', 'dead', 'error', reason, 'finished_ms', now)
    rcall('HDEL', jkey, 'node')
  elseif rcall('EXISTS', jkey) == 0 then
    rcall('HSET', jkey, 'state', 'dead', 'error', reason, 'finished_ms', now)
  end
  rcall('ZADD', dead_key, now, id)
  local excess = rcall('ZCARD', dead_key) - dead_max
  if excess > 0 then
    for _, old in ipairs(rcall('ZRANGE', dead_key, 0, excess - 1)) do
      rcall('DEL', qprefix .. 'job:' .. old)
      rcall('ZREM', dead_key, old)
    end
  end
  for _, old in ipairs(rcall('ZRANGEBYSCORE', dead_key, '-inf', now - dead_ttl, 'LIMIT', 0, 10)) do
    rcall('DEL', qprefix .. 'job:' .. old)
    rcall('ZREM', dead_key, old)
  end
end

local now = now_ms(ARGV[3])
if now == nil or now < 0 then return badarg('now_ms', 'not a non-negative integer') end
if node == nil or node == '' then return badarg('node', 'empty') end
if id == nil or id == '' then return badarg('id', 'empty') end
if mode ~= 'retry' and mode ~= 'dead' then return badarg('mode', 'must be retry or dead') end
local delay = nil
if ARGV[7] ~= '' then
  delay = int_arg(ARGV[7])
  if delay == nil or delay < 0 then return badarg('delay_ms', 'must be an integer >= 0') end
end
local jitter = tonumber(ARGV[8])
if jitter == nil or jitter ~= jitter or jitter < 0 or jitter > 1 then return badarg('jitter', 'must be 0..1') end
local cap = int_arg(ARGV[9])
if cap == nil or cap < 0 then return badarg('backoff_cap_ms', 'must be >= 0') end
local dead_max = int_arg(ARGV[10])
if dead_max == nil or dead_max < 1 then return badarg('dead_max', 'must be >= 1') end
local dead_ttl = int_arg(ARGV[11])
if dead_ttl == nil or dead_ttl < 1 then return badarg('dead_ttl_ms', 'must be >= 1') end

-- Ownership fence: only the node holding the job may fail it.
if rcall('LREM', active_key, 1, id) == 0 then return {-2, 0} end
rcall('ZREM', leases_key, id)
local jkey = qprefix .. 'job:' .. id
local ok, f = pcall(rcall, 'HMGET', jkey, 'attempts', 'max_attempts', 'backoff_ms', 'priority')
if not ok or not f[1] then
  to_dead(id, 'missing_job', now, dead_max, dead_ttl)
  return {-1, 0}
end
local attempts = tonumber(f[1]) or 1
local max_attempts = tonumber(f[2]) or 1

if mode == 'dead' or attempts >= max_attempts then
  to_dead(id, err, now, dead_max, dead_ttl)
  return {2, 0}
end

if delay == nil then
  -- Exponential backoff from the job's base (default 1 s), capped, +/-25% jitter.
  local base = tonumber(f[3] or '1000') or 1000
  local d = math.min(cap, base * math.pow(2, attempts - 1))
  delay = math.floor(d * (0.75 + 0.5 * jitter))
end

if delay == 0 then
  local seq = rcall('INCR', seq_key)
  local score = ready_score(tonumber(f[4] or '0') or 0, seq)
  rcall('HSET', jkey, 'state', 'ready', 'error', err, 'ready_ms', now, 'score', score)
  rcall('HDEL', jkey, 'node')
  rcall('ZADD', ready_key, score, id)
  rcall('PUBLISH', qprefix .. 'wake', 'r')
  return {1, now}
end
local run_at = now + delay
rcall('HSET', jkey, 'state', 'scheduled', 'error', err, 'run_at_ms', string.format('%.0f', run_at))
rcall('HDEL', jkey, 'node')
rcall('ZADD', sched_key, string.format('%.0f', run_at), id)
rcall('PUBLISH', qprefix .. 'wake', 's')
return {1, run_at}
