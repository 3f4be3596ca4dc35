#!lua
--[[
  retry_dead: give dead-lettered jobs a fresh start: back to ready with their attempts reset to
  zero (the last error is kept for reference). Either the given ids, or the oldest `limit`.

  KEYS[1]  dead   ZSET    jobq:{q}:dead
  KEYS[2]  ready  ZSET    jobq:{q}:ready
  KEYS[3]  seq    STRING  jobq:{q}:seq
  KEYS[4]  guard  NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>; channel jobq:{q}:wake.

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  now_ms   integer ms, or "" for the Redis server clock
  ARGV[3]  limit    integer 1..500, used when n = 0
  ARGV[4]  n        0 = the oldest `limit` dead jobs, else 1..500 ids that follow

  Returns: the number of jobs moved back to ready.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(max(n, limit) * log N).
]]
local dead_key, ready_key, seq_key = KEYS[1], KEYS[2], KEYS[3]
local qprefix = ARGV[1]

if #KEYS ~= 4 then return badarg('keys', 'expected 4 keys') end
local e = bad_qprefix(qprefix)
if e then return e end
local now = now_ms(ARGV[2])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local limit = int_arg(ARGV[3])
if limit == nil or limit < 1 or limit > 500 then return badarg('limit', 'must be 1..500') end
local n = int_arg(ARGV[4])
if n == nil or n < 0 or n > 500 then return badarg('n', 'must be 0..500') end
if #ARGV ~= 4 + n then return badarg('argv', 'expected ' .. (4 + n) .. ' values') end
for i = 1, n do
  e = bad_id(ARGV[4 + i]); if e then return e end
end

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
  local score = rcall('ZSCORE', dead_key, id)
  if score then
    rcall('ZREM', dead_key, id)
    -- The entry may outlive its expired hash, and the id may name a newer job since: that job
    -- is left alone (same_incarnation in lib/common.lua).
    if same_incarnation(jkey, score, DEAD_STATES, true) then
      local f = rcall('HMGET', jkey, 'priority', 'unique')
      if f[1] then
        local rscore = ready_score(tonumber(f[1]) or 0, rcall('INCR', seq_key))
        rcall('HSET', jkey, 'state', 'ready', 'attempts', 0, 'ready_ms', now, 'score', rscore)
        rcall('HDEL', jkey, 'finished_ms')
        rcall('PERSIST', jkey) -- dead jobs expire after dead_ttl; a live one must not
        rcall('ZADD', ready_key, rscore, id)
        -- Take the unique key back if nobody took it meanwhile (dead-lettering freed it).
        if f[2] then rcall('SET', qprefix .. 'unique:' .. f[2], id, 'NX') end
        moved = moved + 1
      else
        -- A dead entry without a job to run (missing_job): nothing to retry.
        rcall('DEL', jkey)
      end
    end
  end
end
if moved > 0 then rcall('PUBLISH', qprefix .. 'wake', 'r') end
return moved
