#!lua flags=allow-oom
--[[
  purge: delete up to `limit` jobs from one of a queue's sets (ready, scheduled, dead or
  finished), with their job hashes and unique keys. Never touches running jobs, nor the hash of
  a newer job that reuses the id of an expired dead or finished one. The caller loops until it
  returns 0, so no call blocks Redis for long.

  KEYS[1]  set    ZSET  jobq:{q}:ready | jobq:{q}:scheduled | jobq:{q}:dead | jobq:{q}:finished
  KEYS[2]  guard  NONE  jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>.

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  limit    integer 1..1000

  Returns: the number of jobs deleted.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(limit * log N).
]]
local set_key = KEYS[1]
local qprefix = ARGV[1]

local e = bad_counts(2, 2) or bad_qprefix(qprefix)
if e then return e end
local limit = int_arg(ARGV[2])
if limit == nil or limit < 1 or limit > 1000 then return badarg('limit', 'must be 1..1000') end

-- The dead and finished indexes can outlive their job hashes (those expire), and the id may name
-- a newer job since: its hash is deleted only if it is the incarnation the entry was scored for
-- (same_incarnation in lib/common.lua); the entry itself goes either way.
local states, exact = nil, false
if set_key == qprefix .. 'dead' then
  states, exact = DEAD_STATES, true
elseif set_key == qprefix .. 'finished' then
  states = FINISHED_STATES
end

local ids = rcall('ZRANGE', set_key, 0, limit - 1, 'WITHSCORES')
for i = 1, #ids, 2 do
  local id = ids[i]
  local jkey = qprefix .. 'job:' .. id
  local ok, f = pcall(rcall, 'HMGET', jkey, 'state', 'unique')
  -- A job that started running in the meantime belongs to its node now.
  if ok and f[1] ~= 'active' and (states == nil or same_incarnation(jkey, ids[i + 1], states, exact)) then
    release_unique(qprefix, id, f[2])
    rcall('DEL', jkey)
  end
  rcall('ZREM', set_key, id)
end
return #ids / 2
