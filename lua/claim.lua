#!lua flags=allow-oom
--[[
  claim: lease up to N runnable jobs of one queue to one node. Due scheduled jobs are promoted
  to ready first; then the best jobs are popped from ready (highest priority, FIFO within a
  priority), pushed to the node's active list, leased until now + lease_ms, and their attempt is
  counted. A job whose deadline has passed is dead-lettered with reason "expired" instead of
  being claimed; so are ids with a missing or foreign-typed job key. A paused queue claims
  nothing. Allowed under OOM, so a full Redis can still drain its backlog.

  KEYS[1]  ready      ZSET    jobq:{q}:ready
  KEYS[2]  scheduled  ZSET    jobq:{q}:scheduled
  KEYS[3]  active     LIST    jobq:{q}:active:<node>
  KEYS[4]  leases     ZSET    jobq:{q}:leases         member = job id, score = lease deadline ms
  KEYS[5]  dead       ZSET    jobq:{q}:dead
  KEYS[6]  paused     STRING  jobq:{q}:paused
  KEYS[7]  seq        STRING  jobq:{q}:seq
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>.

  ARGV[1]  qprefix        "jobq:{q}:"
  ARGV[2]  node           the claiming node's id
  ARGV[3]  now_ms         integer ms, or "" for the Redis server clock
  ARGV[4]  lease_ms       integer > 0
  ARGV[5]  max_jobs       integer 0..1000
  ARGV[6]  promote_limit  integer >= 0, due scheduled jobs promoted per call
  ARGV[7]  dead_max       integer >= 1, dead-letter list size bound
  ARGV[8]  dead_ttl_ms    integer >= 1, dead-letter age bound

  Returns: {now_ms, next_due_ms (-1 = none), n_claimed, n_dead,
            n_claimed x (id, task, payload, attempts, max_attempts, timeout_ms, ready_ms),
            n_dead x (id, reason)}
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O((max_jobs + promote_limit) * log N).
]]
local rcall = redis.call
local ready_key, sched_key, active_key, leases_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local dead_key, paused_key, seq_key = KEYS[5], KEYS[6], KEYS[7]
local qprefix, node = ARGV[1], ARGV[2]
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
local lease = int_arg(ARGV[4])
if lease == nil or lease <= 0 then return badarg('lease_ms', 'must be an integer > 0') end
local max_jobs = int_arg(ARGV[5])
if max_jobs == nil or max_jobs < 0 or max_jobs > 1000 then return badarg('max_jobs', 'must be 0..1000') end
local promote_limit = int_arg(ARGV[6])
if promote_limit == nil or promote_limit < 0 then return badarg('promote_limit', 'must be >= 0') end
local dead_max = int_arg(ARGV[7])
if dead_max == nil or dead_max < 1 then return badarg('dead_max', 'must be >= 1') end
local dead_ttl = int_arg(ARGV[8])
if dead_ttl == nil or dead_ttl < 1 then return badarg('dead_ttl_ms', 'must be >= 1') end
if node == nil or node == '' then return badarg('node', 'empty') end

local function next_due()
  local first = rcall('ZRANGE', sched_key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return -1
end

-- A paused queue keeps its jobs where they are.
if rcall('EXISTS', paused_key) == 1 then
  return {now, next_due(), 0, 0}
end

-- Promote due scheduled jobs (bounded), each behind the ready jobs of its priority.
if promote_limit > 0 then
  local due = rcall('ZRANGEBYSCORE', sched_key, '-inf', now, 'LIMIT', 0, promote_limit)
  if #due > 0 then
    local seq = rcall('INCRBY', seq_key, #due) - #due
    for _, id in ipairs(due) do
      seq = seq + 1
      local jkey = qprefix .. 'job:' .. id
      local ok, prio = pcall(rcall, 'HGET', jkey, 'priority')
      if not ok then prio = false end
      local score = ready_score(tonumber(prio or '0') or 0, seq)
      rcall('ZREM', sched_key, id)
      rcall('ZADD', ready_key, score, id)
      if ok and prio then rcall('HSET', jkey, 'state', 'ready', 'ready_ms', now, 'score', score) end
    end
  end
end

local claimed, dead = {}, {}
if max_jobs > 0 then
  local popped = rcall('ZPOPMIN', ready_key, max_jobs)
  for i = 1, #popped, 2 do
    local id = popped[i]
    local jkey = qprefix .. 'job:' .. id
    local ok, f = pcall(rcall, 'HMGET', jkey, 'task', 'payload', 'attempts', 'max_attempts',
      'timeout_ms', 'ready_ms', 'deadline_ms')
    if not ok then
      dead[#dead + 1] = id; dead[#dead + 1] = 'wrong_type'
      rcall('ZADD', dead_key, now, id)
    elseif not f[1] then
      dead[#dead + 1] = id; dead[#dead + 1] = 'missing_job'
      to_dead(id, 'missing_job', now, dead_max, dead_ttl)
    elseif f[7] and tonumber(f[7]) > 0 and now > tonumber(f[7]) then
      -- Not started before its deadline: never run.
      dead[#dead + 1] = id; dead[#dead + 1] = 'expired'
      to_dead(id, 'expired', now, dead_max, dead_ttl)
    else
      local attempts = rcall('HINCRBY', jkey, 'attempts', 1)
      rcall('HSET', jkey, 'state', 'active', 'node', node, 'started_ms', now)
      rcall('RPUSH', active_key, id)
      rcall('ZADD', leases_key, now + lease, id)
      local c = #claimed
      claimed[c + 1] = id; claimed[c + 2] = f[1]; claimed[c + 3] = f[2]
      claimed[c + 4] = attempts; claimed[c + 5] = f[4] or '1'; claimed[c + 6] = f[5] or '0'
      claimed[c + 7] = f[6] or now
    end
  end
end

local out = {now, next_due(), #claimed / 7, #dead / 2}
for _, v in ipairs(claimed) do out[#out + 1] = v end
for _, v in ipairs(dead) do out[#out + 1] = v end
return out
