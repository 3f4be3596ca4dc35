#!lua flags=allow-oom
--[[
  cancel: remove a job that has not started (ready or scheduled) or that is dead-lettered, and
  keep it as "cancelled" for the retention time. A running job cannot be cancelled (its node
  holds it); a finished one has nothing left to cancel. Releases the job's unique key.

  KEYS[1]  ready      ZSET  jobq:{q}:ready
  KEYS[2]  scheduled  ZSET  jobq:{q}:scheduled
  KEYS[3]  dead       ZSET  jobq:{q}:dead
  KEYS[4]  finished   ZSET  jobq:{q}:finished
  KEYS[5]  guard      NONE  jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>.

  ARGV[1]  qprefix       "jobq:{q}:"
  ARGV[2]  id            the job id
  ARGV[3]  now_ms        integer ms, or "" for the Redis server clock
  ARGV[4]  retention_ms  integer >= 0

  Returns: 1 cancelled, -1 no such job, -3 running, -4 already finished.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(log N).
]]
local ready_key, sched_key, dead_key, finished_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local qprefix, id = ARGV[1], ARGV[2]

local e = bad_counts(5, 4) or bad_qprefix(qprefix) or bad_id(id)
if e then return e end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local retention = int_arg(ARGV[4])
if retention == nil or retention < 0 then return badarg('retention_ms', 'must be >= 0') end

local jkey = qprefix .. 'job:' .. id
local ok, f = pcall(rcall, 'HMGET', jkey, 'state', 'unique')
if not ok or not f[1] then return -1 end
local state = f[1]
if state == 'active' then return -3 end
if state == 'done' or state == 'cancelled' then return -4 end
rcall('ZREM', ready_key, id)
rcall('ZREM', sched_key, id)
rcall('ZREM', dead_key, id)
release_unique(qprefix, id, f[2])
if retention > 0 then
  rcall('HSET', jkey, 'state', 'cancelled', 'finished_ms', now)
  rcall('PEXPIRE', jkey, retention)
  rcall('ZADD', finished_key, now + retention, id)
  if rcall('PTTL', finished_key) < retention then rcall('PEXPIRE', finished_key, retention) end
else
  rcall('DEL', jkey)
end
return 1
