#!lua flags=allow-oom
--[[
  ack: finish a batch of jobs one node ran to completion. Fenced by ownership: a job is finished
  only if it is still in this node's active set; otherwise its lease was reaped (or it was never
  claimed here) and the ack is refused, changing nothing. A retried ack of a job this node
  already finished is a no-op. A finished job keeps its result for retention_ms, then expires
  (retention 0 deletes it at once); its unique key is released. The queue keeps at most
  finished_max finished jobs: past it, the oldest are deleted (at most n + 100 per call, so a
  lowered cap is reached over the following calls). Allowed under OOM.

  KEYS[1]  active    ZSET  jobq:{q}:active:<node>
  KEYS[2]  leases    ZSET  jobq:{q}:leases
  KEYS[3]  finished  ZSET  jobq:{q}:finished      member = job id, score = expiry ms
  KEYS[4]  guard     NONE  jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>.

  ARGV[1]  qprefix       "jobq:{q}:"
  ARGV[2]  node          the acking node's id; KEYS[1] must be its active set
  ARGV[3]  now_ms        integer ms, or "" for the Redis server clock
  ARGV[4]  retention_ms  integer >= 0
  ARGV[5]  finished_max  integer >= 0, most finished jobs the queue keeps (0 = no count bound)
  ARGV[6]  n             number of jobs, 1..500; more than one carry at most 2 MiB of results
  then 2 fields per job: id, result (msgpack bytes, "" = no result)

  Returns: one code per job: 1 finished, 0 already finished by this node, -1 no such job,
           -2 lease lost (the ack was refused).
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(n * log N); per job ZREM, HGET and HSET + PEXPIRE (or DEL); past finished_max,
           per deleted finished job one HMGET and one DEL (at most n + 100).
]]
local active_key, leases_key, finished_key = KEYS[1], KEYS[2], KEYS[3]
local qprefix, node = ARGV[1], ARGV[2]

if #KEYS ~= 4 then return badarg('keys', 'expected 4 keys') end
local e = bad_qprefix(qprefix) or bad_node(node)
if e then return e end
if active_key ~= qprefix .. 'active:' .. node then return badarg('node', 'does not match KEYS[1]') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local now_s = fmt_int(now)
local retention = int_arg(ARGV[4])
if retention == nil or retention < 0 then return badarg('retention_ms', 'must be >= 0') end
local finished_max = int_arg(ARGV[5])
if finished_max == nil or finished_max < 0 then return badarg('finished_max', 'must be >= 0') end
local n = int_arg(ARGV[6])
if n == nil or n < 1 or n > 500 then return badarg('n', 'must be 1..500') end
if #ARGV ~= 6 + 2 * n then return badarg('argv', 'expected ' .. (6 + 2 * n) .. ' values') end
local bytes = 0
for i = 1, n do
  e = bad_id(ARGV[5 + 2 * i]); if e then return e end
  bytes = bytes + #ARGV[6 + 2 * i]
  if i > 1 and bytes > MAX_BATCH_BYTES then return badarg('n', 'results over 2 MiB: split the batch') end
end

local codes = {}
local n_finished = 0
local expire_at = now + retention
-- Lease removals and finished-index entries are written with one command each, after the loop.
local unlease, finished_add = {}, {}
for i = 1, n do
  local id, result = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  local jkey = qprefix .. 'job:' .. id
  -- The ownership fence: only the node whose active set holds the job may finish it.
  if rcall('ZREM', active_key, id) == 0 then
    -- Not ours (any more): change nothing. Tell a retried ack apart from a stale one.
    local ok, f = pcall(rcall, 'HMGET', jkey, 'state', 'node')
    if not ok or not f[1] then
      codes[i] = -1
    elseif f[1] == 'done' and f[2] == node then
      codes[i] = 0
    else
      codes[i] = -2
    end
  else
    unlease[#unlease + 1] = id
    local ok, unique = pcall(rcall, 'HGET', jkey, 'unique')
    if ok then release_unique(qprefix, id, unique) end
    if retention > 0 and ok then
      -- 'node' stays on a finished job so a retried ack from the same node is told apart.
      if result ~= '' then
        rcall('HSET', jkey, 'state', 'done', 'finished_ms', now_s, 'result', result)
      else
        rcall('HSET', jkey, 'state', 'done', 'finished_ms', now_s)
      end
      rcall('PEXPIRE', jkey, ARGV[4]) -- retention_ms, canonical (int_arg)
      finished_add[#finished_add + 1] = expire_at; finished_add[#finished_add + 1] = id
      n_finished = n_finished + 1
    else
      rcall('DEL', jkey)
    end
    codes[i] = 1
  end
end

if #unlease > 0 then rcall('ZREM', leases_key, unpack(unlease)) end
if n_finished > 0 then
  rcall('ZADD', finished_key, unpack(finished_add))
  -- The index lives as long as its newest entry; drop entries whose hash has expired (bounded).
  if rcall('PTTL', finished_key) < retention then rcall('PEXPIRE', finished_key, retention) end
  local gone = rcall('ZRANGEBYSCORE', finished_key, '-inf', now, 'LIMIT', 0, n + 10)
  if #gone > 0 then rcall('ZREM', finished_key, unpack(gone)) end
  -- The count bound: past finished_max, the jobs that expire first go now, with their hashes
  -- (unless the id names a newer job since: same_incarnation in lib/common.lua).
  local excess = finished_max > 0 and rcall('ZCARD', finished_key) - finished_max or 0
  if excess > 0 then
    local old = rcall('ZRANGE', finished_key, 0, math.min(excess, n + 100) - 1, 'WITHSCORES')
    local drop = {}
    for i = 1, #old, 2 do
      local jkey = qprefix .. 'job:' .. old[i]
      if same_incarnation(jkey, old[i + 1], FINISHED_STATES, false) then rcall('DEL', jkey) end
      drop[#drop + 1] = old[i]
    end
    rcall('ZREM', finished_key, unpack(drop))
  end
end
return codes
