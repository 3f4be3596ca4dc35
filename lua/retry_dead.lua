#!lua
--[[
  retry_dead: give dead-lettered jobs a fresh start: back to ready with their attempts reset to
  zero (the last error is kept for reference). Either the given ids, or the oldest `limit`.

  KEYS[1]  dead   ZSET    jobq:{q}:dead
  KEYS[2]  ready  ZSET    jobq:{q}:ready
  KEYS[3]  seq    STRING  jobq:{q}:seq
  KEYS[4]  events STREAM  jobq:{q}:events       "requeued" per dead job put back (lib/common.lua emit)
  KEYS[5]  guard  NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:idle; idle nodes are
  woken on jobq:{q}:wake:<node> (lib/common.lua wake_idle).

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  now_ms   integer ms, or "" for the Redis server clock
  ARGV[3]  limit    integer 1..500, used when n = 0
  ARGV[4]  n        0 = the oldest `limit` dead jobs, else 1..500 ids that follow
  then, last:
  ARGV[5 + n]  events_max  integer >= 0, the events stream's length cap (0 = no events)

  Returns: the number of jobs moved back to ready.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(max(n, limit) * log N); per job one HMGET, HSET, HDEL and PERSIST (and ZSCORE for
           given ids, SET for a unique key).
]]
local dead_key, ready_key, seq_key = KEYS[1], KEYS[2], KEYS[3]
local qprefix = ARGV[1]

if #KEYS ~= 5 then return badarg('keys', 'expected 5 keys') end
local e = bad_qprefix(qprefix)
if e then return e end
local now = now_ms(ARGV[2])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local limit = int_arg(ARGV[3])
if limit == nil or limit < 1 or limit > 500 then return badarg('limit', 'must be 1..500') end
local n = int_arg(ARGV[4])
if n == nil or n < 0 or n > 500 then return badarg('n', 'must be 0..500') end
if #ARGV ~= 5 + n then return badarg('argv', 'expected ' .. (5 + n) .. ' values') end
e = bad_events(qprefix); if e then return e end
for i = 1, n do
  e = bad_id(ARGV[4 + i]); if e then return e end
end

-- The entries to retry, with their scores (time of death).
local ids, scores = {}, {}
if n == 0 then
  local got = rcall('ZRANGE', dead_key, 0, limit - 1, 'WITHSCORES')
  for i = 1, #got, 2 do ids[#ids + 1] = got[i]; scores[#scores + 1] = got[i + 1] end
else
  local seen = {}
  for i = 1, n do
    local id = ARGV[4 + i]
    local score = not seen[id] and rcall('ZSCORE', dead_key, id)
    seen[id] = true
    if score then ids[#ids + 1] = id; scores[#scores + 1] = score end
  end
end
if #ids == 0 then return 0 end

-- One INCRBY reserves the ready sequence numbers; the entries leave dead and enter ready with
-- one command each.
local seq = rcall('INCRBY', seq_key, #ids) - #ids
local ready_add = {}
for i, id in ipairs(ids) do
  local jkey = qprefix .. 'job:' .. id
  local ok, f = pcall(rcall, 'HMGET', jkey, 'state', 'finished_ms', 'priority', 'unique', 'task')
  -- The entry may outlive its expired hash, and the id may name a newer job since: that job is
  -- left alone (the rule of same_incarnation in lib/common.lua, on the fields read here).
  if ok and f[1] == 'dead' and tonumber(f[2] or '') == tonumber(scores[i]) then
    if f[3] then
      seq = seq + 1
      local rscore = ready_score(tonumber(f[3]) or 0, seq)
      rcall('HSET', jkey, 'state', 'ready', 'attempts', 0, 'ready_ms', now, 'score', rscore)
      -- A fresh start: no finished attempt and no interruption carried over.
      rcall('HDEL', jkey, 'finished_ms', 'finished_by', 'interrupted')
      rcall('PERSIST', jkey) -- dead jobs expire after dead_ttl; a live one must not
      ready_add[#ready_add + 1] = rscore; ready_add[#ready_add + 1] = id
      emit('requeued', id, now, 'task', f[5] or '')
      -- Take the unique key back if nobody took it meanwhile (dead-lettering freed it).
      if f[4] then rcall('SET', qprefix .. 'unique:' .. f[4], id, 'NX') end
    else
      -- A dead entry without a job to run (missing_job): nothing to retry.
      rcall('DEL', jkey)
    end
  end
end
rcall('ZREM', dead_key, unpack(ids))
if #ready_add > 0 then rcall('ZADD', ready_key, unpack(ready_add)) end
local moved = #ready_add / 2
if moved > 0 then wake_idle(qprefix, moved, 'r') end
return moved
