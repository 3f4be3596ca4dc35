#!lua flags=allow-oom
--[[
  reap: recover the jobs of nodes that stopped renewing their leases. Safe when many nodes run
  it at once: each expired lease is handled by exactly one call, since the whole step is atomic.
  1. Every job whose lease expired (bounded by limit) leaves its node's active set: back to its
     old place in ready (its attempt stays counted), or to the dead-letter list with reason
     "lease_expired" when it has no attempts left.
  2. Nodes whose heartbeat is older than node_ttl_ms: active entries that have no lease at all
     (a repair; claim writes both) go back to ready the same way, and once a dead node's list is
     empty its list and its entry in the queue's node set are removed.
  3. Dead letters older than dead_ttl_ms are deleted (at most 100 per call).
  An optional once-per-interval guard key saves load when many nodes reap the same queue; it is
  not needed for correctness. Allowed under OOM.

  KEYS[1]  leases     ZSET    jobq:{q}:leases
  KEYS[2]  ready      ZSET    jobq:{q}:ready
  KEYS[3]  dead       ZSET    jobq:{q}:dead
  KEYS[4]  nodes      ZSET    jobq:{q}:nodes
  KEYS[5]  seq        STRING  jobq:{q}:seq
  KEYS[6]  reap_lock  STRING  jobq:{q}:reap-lock
  KEYS[7]  events     STREAM  jobq:{q}:events       "reaped" per requeued job, "dead"
  KEYS[8]  guard      NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:active:<node> (ZSET),
  jobq:{q}:unique:<key>, jobq:{q}:idle; idle nodes are woken on jobq:{q}:wake:<node>
  (lib/common.lua wake_idle).

  ARGV[1]  qprefix      "jobq:{q}:"
  ARGV[2]  now_ms       integer ms, or "" for the Redis server clock
  ARGV[3]  limit        integer 1..250, most leases handled per call
  ARGV[4]  node_ttl_ms  integer > 0, a node silent this long is dead
  ARGV[5]  dead_max     integer >= 1
  ARGV[6]  dead_ttl_ms  integer >= 1
  ARGV[7]  guard_ms     integer >= 0; > 0 = skip (return {-1}) if another reap ran within it
  ARGV[8]  events_max   integer >= 0, the events stream's length cap (0 = no events)

  Returns: {n_requeued, n_dead, requeued ids..., dead ids..., dead_trimmed}, or {-1} when skipped
           by the guard; dead_trimmed = dead letters deleted because the list was over dead_max.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(limit * log N); per expired lease one HMGET and one ZREM, per requeued job one
           HSET and one HDEL, and one ZREM of leases and one ZADD to ready per call.
]]
local leases_key, ready_key, dead_key, nodes_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local seq_key, lock_key = KEYS[5], KEYS[6]
local qprefix = ARGV[1]

local e = bad_counts(8, 8) or bad_qprefix(qprefix) or bad_events(qprefix)
if e then return e end
local now = now_ms(ARGV[2])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local limit = int_arg(ARGV[3])
if limit == nil or limit < 1 or limit > 250 then return badarg('limit', 'must be 1..250') end
local node_ttl = int_arg(ARGV[4])
if node_ttl == nil or node_ttl <= 0 then return badarg('node_ttl_ms', 'must be > 0') end
local dead_max = int_arg(ARGV[5])
if dead_max == nil or dead_max < 1 then return badarg('dead_max', 'must be >= 1') end
local dead_ttl = int_arg(ARGV[6])
if dead_ttl == nil or dead_ttl < 1 then return badarg('dead_ttl_ms', 'must be >= 1') end
local guard = int_arg(ARGV[7])
if guard == nil or guard < 0 then return badarg('guard_ms', 'must be >= 0') end

if guard > 0 and not rcall('SET', lock_key, now, 'NX', 'PX', guard) then return {-1} end

local requeued, dead = {}, {}

-- An active LIST left by a jobq from before the active ZSET (a node stopped without releasing,
-- then jobq upgraded): converted in place, once, so it is read like any other. Such a list
-- holds what one node had claimed (a few thousand ids at most).
local function upgrade_active(akey)
  if rcall('TYPE', akey)['ok'] ~= 'list' then return end
  local ids = rcall('LRANGE', akey, 0, -1)
  rcall('DEL', akey)
  for first = 1, #ids, 1000 do
    local add = {}
    for i = first, math.min(first + 999, #ids) do add[#add + 1] = now; add[#add + 1] = ids[i] end
    rcall('ZADD', akey, unpack(add))
  end
end

-- Remove an id from a node's active set: 1 if it was there.
local function active_rem(akey, id)
  local ok, n = pcall(rcall, 'ZREM', akey, id)
  if ok then return n end
  upgrade_active(akey)
  return rcall('ZREM', akey, id)
end

-- Ready entries of requeued jobs, written with one ZADD after the loops.
local ready_add = {}

-- Put one job taken from a dead or silent node back to work, or bury it. f = the job's HMGET
-- of JOB_FIELDS (read here when not given; ok = false: not a hash).
local JOB_FIELDS = {'attempts', 'max_attempts', 'score', 'priority', 'reaped', 'node', 'task'}
local function read_job(jkey)
  return pcall(rcall, 'HMGET', jkey, unpack(JOB_FIELDS))
end
local function recover(id, ok, f)
  local jkey = qprefix .. 'job:' .. id
  if ok == nil then ok, f = read_job(jkey) end
  if not ok or not f[4] then
    -- No usable job hash: nothing to run. Dead-letter the id so it is seen.
    to_dead(qprefix, dead_key, id, ok and 'missing_job' or 'wrong_type', now, dead_max, dead_ttl)
    dead[#dead + 1] = id
    return
  end
  local attempts, max_attempts = tonumber(f[1]) or 0, tonumber(f[2]) or 1
  if attempts >= max_attempts then
    to_dead(qprefix, dead_key, id,
      'lease_expired: the node running attempt ' .. attempts .. ' stopped renewing its lease',
      now, dead_max, dead_ttl)
    dead[#dead + 1] = id
    return
  end
  -- Back to its old place in ready (the score it had when claimed); the attempt stays counted.
  local score = f[3]
  if not score then score = ready_score(tonumber(f[4]) or 0, rcall('INCR', seq_key)) end
  rcall('HSET', jkey, 'state', 'ready', 'ready_ms', now, 'score', score,
    'error', 'lease_expired: attempt ' .. attempts .. ' was lost with its node',
    'reaped', (tonumber(f[5]) or 0) + 1)
  rcall('HDEL', jkey, 'node')
  ready_add[#ready_add + 1] = score; ready_add[#ready_add + 1] = id
  requeued[#requeued + 1] = id
  emit('reaped', id, now, 'task', f[7] or '', 'attempt', f[1] or '0', 'node', f[6] or '')
end

-- 1. Expired leases (deadline < now). They are all removed before any job is looked at, so
-- when many reapers run, exactly one of them sees each.
local expired = rcall('ZRANGEBYSCORE', leases_key, '-inf', now - 1, 'LIMIT', 0, limit)
if #expired > 0 then rcall('ZREM', leases_key, unpack(expired)) end
for _, id in ipairs(expired) do
  local ok, f = read_job(qprefix .. 'job:' .. id)
  -- Only a job its owner still holds (the active set is a ZSET: removal is O(log A)).
  if ok and f[6] and active_rem(qprefix .. 'active:' .. f[6], id) == 1 then recover(id, ok, f) end
end

-- 2. Silent nodes: repair active entries without a lease; forget nodes with nothing left.
local budget = limit - #expired
if budget > 0 then
  for _, node in ipairs(rcall('ZRANGEBYSCORE', nodes_key, '-inf', now - node_ttl, 'LIMIT', 0, 10)) do
    local akey = qprefix .. 'active:' .. node
    upgrade_active(akey)
    for _, id in ipairs(rcall('ZRANGE', akey, 0, budget - 1)) do
      if not rcall('ZSCORE', leases_key, id) then
        rcall('ZREM', akey, id)
        recover(id)
        budget = budget - 1
      end
    end
    if rcall('ZCARD', akey) == 0 then
      rcall('DEL', akey)
      rcall('ZREM', nodes_key, node)
      rcall('ZREM', qprefix .. 'idle', node) -- its wake-up token, if a job never popped it
    end
    if budget <= 0 then break end
  end
end
if #ready_add > 0 then rcall('ZADD', ready_key, unpack(ready_add)) end

-- 3. Dead letters past their age bound, even when nothing new dies (bounded).
trim_dead(qprefix, dead_key, now, dead_max, dead_ttl, 100)

if #requeued > 0 then wake_idle(qprefix, #requeued, 'r') end
local out = {#requeued, #dead}
for _, id in ipairs(requeued) do out[#out + 1] = id end
for _, id in ipairs(dead) do out[#out + 1] = id end
out[#out + 1] = dead_trimmed
return out
