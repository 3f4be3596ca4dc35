#!lua flags=allow-oom
--[[
  release: hand jobs a node holds back to ready, each to its old place in the ready order: on
  graceful shutdown, for claimed jobs the node does not know of, and for prefetched jobs it did
  not start in time. Fenced per attempt like ack: only jobs in this node's active set, and only
  when the attempt named is the job's current one. A job that never started (the prefetch
  buffer; max_interruptions 0) goes back uncounted: its attempt is given back. A job that did
  start keeps its attempt and counts an interruption ("interrupted" on the job); at its
  max_interruptions-th interruption it is dead-lettered instead, with reason "interrupted", so a
  job longer than the shutdown grace cannot re-run at every deploy forever. A job whose hash is
  missing or unusable is dead-lettered ("missing_job" / "wrong_type"), as reap does. Allowed
  under OOM.

  KEYS[1]  active  ZSET    jobq:{q}:active:<node>
  KEYS[2]  leases  ZSET    jobq:{q}:leases
  KEYS[3]  ready   ZSET    jobq:{q}:ready
  KEYS[4]  seq     STRING  jobq:{q}:seq
  KEYS[5]  dead    ZSET    jobq:{q}:dead
  KEYS[6]  events  STREAM  jobq:{q}:events       "released" or "interrupted" per job, "dead"
  KEYS[7]  guard   NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:unique:<key>,
  jobq:{q}:idle; idle nodes are woken on jobq:{q}:wake:<node> (lib/common.lua wake_idle).

  ARGV[1]  qprefix      "jobq:{q}:"
  ARGV[2]  node         the node's id
  ARGV[3]  now_ms       integer ms, or "" for the Redis server clock
  ARGV[4]  n            0 = every job in the active set (up to 500 per call), each as never
                        started; else 1..500 jobs that follow
  ARGV[5]  dead_max     integer >= 1
  ARGV[6]  dead_ttl_ms  integer >= 1
  then 3 fields per job: id; attempt (the attempt number the claim returned, "" = the attempt
  this node holds); max_interruptions (integer 0..1000000: 0 = never started, else the job
  started and is dead-lettered at this many interruptions)
  then, last:
  ARGV[7 + 3n]  events_max  integer >= 0, the events stream's length cap (0 = no events)

  Returns: {n_released, n_interrupted, n_dead, dead_trimmed, n_dead x (id, reason)}:
           n_released jobs went back to ready, n_interrupted of them started (an interruption
           counted); n_dead were dead-lettered; dead_trimmed = dead letters deleted because the
           list was over dead_max.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(n * log N).
]]
local active_key, leases_key, ready_key, seq_key, dead_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local qprefix, node = ARGV[1], ARGV[2]

if #KEYS ~= 7 then return badarg('keys', 'expected 7 keys') end
local e = bad_qprefix(qprefix) or bad_node(node)
if e then return e end
if active_key ~= qprefix .. 'active:' .. node then return badarg('node', 'does not match KEYS[1]') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local n = int_arg(ARGV[4])
if n == nil or n < 0 or n > 500 then return badarg('n', 'must be 0..500') end
local dead_max = int_arg(ARGV[5])
if dead_max == nil or dead_max < 1 then return badarg('dead_max', 'must be >= 1') end
local dead_ttl = int_arg(ARGV[6])
if dead_ttl == nil or dead_ttl < 1 then return badarg('dead_ttl_ms', 'must be >= 1') end
if #ARGV ~= 7 + 3 * n then return badarg('argv', 'expected ' .. (7 + 3 * n) .. ' values') end
e = bad_events(qprefix); if e then return e end
for i = 1, n do
  e = bad_id(ARGV[4 + 3 * i]); if e then return e end
  local a = ARGV[5 + 3 * i]
  if a ~= '' then
    a = int_arg(a)
    if a == nil or a < 1 then return badarg('attempt', 'must be an integer >= 1 or empty') end
  end
  local m = int_arg(ARGV[6 + 3 * i])
  if m == nil or m < 0 or m > 1000000 then return badarg('max_interruptions', 'must be 0..1000000') end
end

local jobs = {}
if n == 0 then
  for _, id in ipairs(rcall('ZRANGE', active_key, 0, 499)) do jobs[#jobs + 1] = {id, '', 0} end
else
  for i = 1, n do
    jobs[i] = {ARGV[4 + 3 * i], ARGV[5 + 3 * i], tonumber(ARGV[6 + 3 * i])}
  end
end

local released, interrupted, dead = 0, 0, {}
for _, job in ipairs(jobs) do
  local id, attempt, max_int = job[1], job[2], job[3]
  local jkey = qprefix .. 'job:' .. id
  local ok, f = pcall(rcall, 'HMGET', jkey, 'attempts', 'score', 'priority', 'interrupted', 'task')
  if not ok or not f[3] then
    -- No usable job hash: nothing to run. If this node holds the id, dead-letter it so it is
    -- seen (as reap does), instead of dropping it silently.
    if rcall('ZREM', active_key, id) == 1 then
      rcall('ZREM', leases_key, id)
      local reason = ok and 'missing_job' or 'wrong_type'
      to_dead(qprefix, dead_key, id, reason, now, dead_max, dead_ttl)
      dead[#dead + 1] = id; dead[#dead + 1] = reason
    end
  else
    if attempt == '' then attempt = f[1] end
    -- Only this node's hold of this attempt; anything else is left alone.
    if tonumber(f[1]) == tonumber(attempt) and rcall('ZREM', active_key, id) == 1 then
      rcall('ZREM', leases_key, id)
      local count = (tonumber(f[4] or '0') or 0) + 1
      if max_int > 0 and count >= max_int then
        -- Interrupted too often: it would re-run at every shutdown forever.
        local reason = 'interrupted: stopped mid-run by a node shutdown ' .. count .. ' times'
        rcall('HSET', jkey, 'interrupted', count)
        to_dead(qprefix, dead_key, id, reason, now, dead_max, dead_ttl)
        dead[#dead + 1] = id; dead[#dead + 1] = reason
      else
        local score = f[2]
        if not score then score = ready_score(tonumber(f[3]) or 0, rcall('INCR', seq_key)) end
        if max_int == 0 then
          -- Never started: the attempt does not count.
          rcall('HINCRBY', jkey, 'attempts', -1)
          rcall('HSET', jkey, 'state', 'ready', 'ready_ms', now, 'score', score)
          emit('released', id, now, 'task', f[5] or '', 'attempt', attempt or '0')
        else
          -- Started: the attempt stays counted, and the interruption is counted too.
          rcall('HSET', jkey, 'state', 'ready', 'ready_ms', now, 'score', score, 'interrupted', count)
          interrupted = interrupted + 1
          emit('interrupted', id, now, 'task', f[5] or '', 'attempt', attempt or '0')
        end
        rcall('HDEL', jkey, 'node')
        rcall('ZADD', ready_key, score, id)
        released = released + 1
      end
    end
  end
end
if released > 0 then wake_idle(qprefix, released, 'r') end
local out = {released, interrupted, #dead / 2, dead_trimmed}
for _, v in ipairs(dead) do out[#out + 1] = v end
return out
