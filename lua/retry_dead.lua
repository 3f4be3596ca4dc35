#!lua
--[[
  retry_dead: give dead-lettered jobs a fresh start: back to ready with their attempts reset to
  zero (the last error is kept for reference). Either the given ids, or the oldest `limit`.

  KEYS[1]  dead   ZSET    jobq:{q}:dead
  KEYS[2]  ready  ZSET    jobq:{q}:ready
  KEYS[3]  seq    STRING  jobq:{q}:seq
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>; channel jobq:{q}:wake.

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  now_ms   integer ms, or "" for the Redis server clock
  ARGV[3]  limit    integer 1..10000, used when n = 0
  ARGV[4]  n        0 = the oldest `limit` dead jobs, else 1..1000 ids that follow

  Returns: the number of jobs moved back to ready.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(max(n, limit) * log N).
]]
local rcall = redis.call
local dead_key, ready_key, seq_key = KEYS[1], KEYS[2], KEYS[3]
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
local n = int_arg(ARGV[4])
if n == nil or n < 0 or n > 1000 then return badarg('n', 'must be 0..1000') end
if #ARGV ~= 4 + n then return badarg('argv', 'expected ' .. (4 + n) .. ' values') end

local ids
if n == 0 then
  ids = rcall('ZRANGE', dead_key, 0, limit - 1)
else
  ids = {}
  for i = 1, n do ids[i] = ARGV[4 + i] end
end

local moved = 0
for _, id in ipairs(ids) do
  local jkey = qprefix .. 'job:' .. id
  local ok, prio = pcall(rcall, 'HGET', jkey, 'priority')
  if rcall('ZREM', dead_key, id) == 1 then
    if ok and prio then
      local score = ready_score(tonumber(prio) or 0, rcall('INCR', seq_key))
      rcall('HSET', jkey, 'state', 'ready', 'attempts', 0, 'ready_ms', now, 'score', score)
      rcall('HDEL', jkey, 'finished_ms')
      rcall('ZADD', ready_key, score, id)
      moved = moved + 1
    else
      -- A dead entry without a job to run (missing_job / wrong_type): nothing to retry.
      if ok then rcall('DEL', jkey) end
    end
  end
end
if moved > 0 then rcall('PUBLISH', qprefix .. 'wake', 'r') end
return moved
