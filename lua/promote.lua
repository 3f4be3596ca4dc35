#!lua flags=allow-oom
--[[
  promote: move due scheduled jobs (run-at <= now) to ready, each behind the ready jobs of its
  priority, and announce them. Bounded by limit; the caller loops while a full batch moved.

  KEYS[1]  scheduled  ZSET    jobq:{q}:scheduled
  KEYS[2]  ready      ZSET    jobq:{q}:ready
  KEYS[3]  seq        STRING  jobq:{q}:seq
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>; channel jobq:{q}:wake.

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  now_ms   integer ms, or "" for the Redis server clock
  ARGV[3]  limit    integer 1..10000

  Returns: {n_promoted, next_due_ms (-1 = none), now_ms}
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(limit * log N).
]]
local rcall = redis.call
local sched_key, ready_key, seq_key = KEYS[1], KEYS[2], KEYS[3]
local qprefix = ARGV[1]
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

local now = now_ms(ARGV[2])
if now == nil or now < 0 then return badarg('now_ms', 'not a non-negative integer') end
local limit = int_arg(ARGV[3])
if limit == nil or limit < 1 or limit > 10000 then return badarg('limit', 'must be 1..10000') end

local due = rcall('ZRANGEBYSCORE', sched_key, '-inf', now, 'LIMIT', 0, limit)
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
  rcall('PUBLISH', qprefix .. 'wake', 'r')
end
local first = rcall('ZRANGE', sched_key, 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then next_due = tonumber(first[2]) end
return {#due, next_due, now}
