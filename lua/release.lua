#!lua flags=allow-oom
--[[
  release: on graceful shutdown (or for a claimed job the node does not know of), hand jobs a
  node holds back to ready without counting an attempt. Each job returns to its old place in
  the ready order. Only jobs in this node's active set are touched. Allowed under OOM.

  KEYS[1]  active  ZSET    jobq:{q}:active:<node>
  KEYS[2]  leases  ZSET    jobq:{q}:leases
  KEYS[3]  ready   ZSET    jobq:{q}:ready
  KEYS[4]  seq     STRING  jobq:{q}:seq
  KEYS[5]  guard   NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>.

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  node     the node's id
  ARGV[3]  now_ms   integer ms, or "" for the Redis server clock
  ARGV[4]  n        0 = the jobs in the active set (up to 500 per call), else 1..500 ids
  then n job ids

  Returns: the number of jobs released.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(n * log N).
]]
local active_key, leases_key, ready_key, seq_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local qprefix, node = ARGV[1], ARGV[2]

if #KEYS ~= 5 then return badarg('keys', 'expected 5 keys') end
local e = bad_qprefix(qprefix) or bad_node(node)
if e then return e end
if active_key ~= qprefix .. 'active:' .. node then return badarg('node', 'does not match KEYS[1]') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local n = int_arg(ARGV[4])
if n == nil or n < 0 or n > 500 then return badarg('n', 'must be 0..500') end
if #ARGV ~= 4 + n then return badarg('argv', 'expected ' .. (4 + n) .. ' values') end
for i = 1, n do
  e = bad_id(ARGV[4 + i]); if e then return e end
end

local ids
if n == 0 then
  ids = rcall('ZRANGE', active_key, 0, 499)
else
  ids = {}
  for i = 1, n do ids[i] = ARGV[4 + i] end
end

local released = 0
for _, id in ipairs(ids) do
  -- Only jobs this node still holds; anything else is left alone.
  if rcall('ZREM', active_key, id) == 1 then
    rcall('ZREM', leases_key, id)
    local jkey = qprefix .. 'job:' .. id
    local ok, f = pcall(rcall, 'HMGET', jkey, 'score', 'priority')
    if ok and f[2] then
      local score = f[1]
      if not score then score = ready_score(tonumber(f[2]) or 0, rcall('INCR', seq_key)) end
      -- The attempt never ran to an end: it does not count.
      rcall('HINCRBY', jkey, 'attempts', -1)
      rcall('HSET', jkey, 'state', 'ready', 'ready_ms', now, 'score', score)
      rcall('HDEL', jkey, 'node')
      rcall('ZADD', ready_key, score, id)
      released = released + 1
    end
  end
end
if released > 0 then rcall('PUBLISH', qprefix .. 'wake', 'r') end
return released
