#!lua flags=allow-oom
--[[
  purge: delete up to `limit` jobs from one of a queue's sets (ready, scheduled, dead or
  finished), with their job hashes and unique keys. Never touches running jobs. The caller loops
  until it returns 0, so no call blocks Redis for long.

  KEYS[1]  set  ZSET  jobq:{q}:ready | jobq:{q}:scheduled | jobq:{q}:dead | jobq:{q}:finished
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>.

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  limit    integer 1..10000

  Returns: the number of jobs deleted.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(limit * log N).
]]
local rcall = redis.call
local set_key = KEYS[1]
local qprefix = ARGV[1]

local limit = tonumber(ARGV[2])
if limit == nil or limit ~= math.floor(limit) or limit < 1 or limit > 10000 then
  return redis.error_reply('BADARG limit must be 1..10000')
end

local ids = rcall('ZRANGE', set_key, 0, limit - 1)
for _, id in ipairs(ids) do
  local jkey = qprefix .. 'job:' .. id
  local ok, f = pcall(rcall, 'HMGET', jkey, 'state', 'unique')
  -- A job that started running in the meantime belongs to its node now.
  if ok and f[1] == 'active' then
    rcall('ZREM', set_key, id)
  else
    if ok and f[2] then
      local ukey = qprefix .. 'unique:' .. f[2]
      if rcall('GET', ukey) == id then rcall('DEL', ukey) end
    end
    if ok then rcall('DEL', jkey) end
    rcall('ZREM', set_key, id)
  end
end
return #ids
