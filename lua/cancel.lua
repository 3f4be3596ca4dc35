#!lua flags=allow-oom
--[[
  cancel: end a job that has not finished as "cancelled", kept for the retention time. A job not
  started (ready or scheduled) or dead-lettered leaves its list. A running job (active) leaves
  its node's active set and the leases at once, so that node's later ack, fail or release of
  the attempt is refused (the per-attempt fence: the job is no longer in its active set), no
  reaper retries it, and its result is never stored; the node is told on its own wake-up
  channel (SPUBLISH "cancel <id>") and, as the fallback that cannot be missed, by its next lease
  renewal (the id is added to jobq:{q}:cancels:<node>, which extend reads and empties). A
  finished one has nothing left to cancel. Releases the job's unique key.

  KEYS[1]  ready      ZSET  jobq:{q}:ready
  KEYS[2]  scheduled  ZSET  jobq:{q}:scheduled
  KEYS[3]  dead       ZSET  jobq:{q}:dead
  KEYS[4]  finished   ZSET  jobq:{q}:finished
  KEYS[5]  leases     ZSET  jobq:{q}:leases
  KEYS[6]  events     STREAM jobq:{q}:events    "cancelled" (lib/common.lua emit)
  KEYS[7]  guard      NONE  jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>,
  jobq:{q}:active:<node>, jobq:{q}:cancels:<node> (SET of ids, expires after a day).
  Shard channel: jobq:{q}:wake:<node> (the node's wake-up channel, on the queue's shard).

  ARGV[1]  qprefix       "jobq:{q}:"
  ARGV[2]  id            the job id
  ARGV[3]  now_ms        integer ms, or "" for the Redis server clock
  ARGV[4]  retention_ms  integer >= 0
  ARGV[5]  events_max    integer >= 0, the events stream's length cap (0 = no events)

  Returns: 1 cancelled before it ran, 2 cancelled while running (its node is told),
           -1 no such job, -4 already finished.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(log N).
]]
local ready_key, sched_key, dead_key, finished_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leases_key = KEYS[5]
local qprefix, id = ARGV[1], ARGV[2]

local e = bad_counts(7, 5) or bad_qprefix(qprefix) or bad_id(id) or bad_events(qprefix)
if e then return e end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local retention = int_arg(ARGV[4])
if retention == nil or retention < 0 then return badarg('retention_ms', 'must be >= 0') end

local jkey = qprefix .. 'job:' .. id
local ok, f = pcall(rcall, 'HMGET', jkey, 'state', 'unique', 'node', 'task', 'attempts')
if not ok or not f[1] then return -1 end
local state = f[1]
if state == 'done' or state == 'cancelled' then return -4 end
local code = 1
if state == 'active' then
  -- Running (or claimed ahead) on f[3]: take it from that node now; the node stops the task.
  code = 2
  rcall('ZREM', leases_key, id)
  local node = f[3]
  if node and node ~= '' then
    rcall('ZREM', qprefix .. 'active:' .. node, id)
    local marks = qprefix .. 'cancels:' .. node
    rcall('SADD', marks, id)
    rcall('PEXPIRE', marks, 86400000)
    rcall('SPUBLISH', qprefix .. 'wake:' .. node, 'cancel ' .. id)
  end
else
  rcall('ZREM', ready_key, id)
  rcall('ZREM', sched_key, id)
  rcall('ZREM', dead_key, id)
end
release_unique(qprefix, id, f[2])
emit('cancelled', id, now, 'task', f[4] or '', 'attempt', f[5] or '0', 'state', state)
if retention > 0 then
  rcall('HSET', jkey, 'state', 'cancelled', 'finished_ms', now)
  rcall('PEXPIRE', jkey, retention)
  rcall('ZADD', finished_key, now + retention, id)
  if rcall('PTTL', finished_key) < retention then rcall('PEXPIRE', finished_key, retention) end
else
  rcall('DEL', jkey)
end
return code
