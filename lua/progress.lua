#!lua flags=allow-oom
--[[
  progress: record how far a running job has got, from the task itself (jobq.current_job()
  .progress). Fenced per attempt like ack: written only while the attempt named is the job's
  current one and the job is in this node's active set, so a cancelled, reaped or finished job
  keeps what it had. Allowed under OOM (a few bytes on an existing hash).

  KEYS[1]  active  ZSET  jobq:{q}:active:<node>
  KEYS[2]  events  STREAM jobq:{q}:events   "progress" (lib/common.lua emit)
  KEYS[3]  guard   NONE  jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>.

  ARGV[1]  qprefix   "jobq:{q}:"
  ARGV[2]  node      the node's id; KEYS[1] must be its active set
  ARGV[3]  now_ms    integer ms, or "" for the Redis server clock
  ARGV[4]  id        the job id
  ARGV[5]  attempt   integer >= 1, the attempt number the claim returned
  ARGV[6]  fraction  a number 0..1
  ARGV[7]  message   "" (none) or up to 1024 bytes
  ARGV[8]  events_max  integer >= 0, the events stream's length cap (0 = no events)

  Returns: 1 recorded, -2 refused: the job is not this attempt's on this node (any more).
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(log N).
]]
local active_key = KEYS[1]
local qprefix, node, id, message = ARGV[1], ARGV[2], ARGV[4], ARGV[7]

local e = bad_counts(3, 8) or bad_qprefix(qprefix) or bad_node(node) or bad_id(id) or bad_events(qprefix)
if e then return e end
if active_key ~= qprefix .. 'active:' .. node then return badarg('node', 'does not match KEYS[1]') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local attempt = int_arg(ARGV[5])
if attempt == nil or attempt < 1 then return badarg('attempt', 'must be an integer >= 1') end
local fraction = tonumber(ARGV[6])
if fraction == nil or fraction ~= fraction or fraction < 0 or fraction > 1 then
  return badarg('fraction', 'must be a number 0..1')
end
if #message > 1024 then return badarg('message', 'at most 1024 bytes') end

if rcall('ZSCORE', active_key, id) == false then return -2 end
local jkey = qprefix .. 'job:' .. id
local ok, f = pcall(rcall, 'HMGET', jkey, 'attempts', 'state')
if not ok or f[2] ~= 'active' or tonumber(f[1]) ~= attempt then return -2 end
if message ~= '' then
  rcall('HSET', jkey, 'progress', ARGV[6], 'progress_ms', now, 'progress_msg', message)
else
  rcall('HSET', jkey, 'progress', ARGV[6], 'progress_ms', now)
  rcall('HDEL', jkey, 'progress_msg')
end
if message ~= '' then
  emit('progress', id, now, 'attempt', ARGV[5], 'fraction', ARGV[6], 'message', message)
else
  emit('progress', id, now, 'attempt', ARGV[5], 'fraction', ARGV[6])
end
return 1
