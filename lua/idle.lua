#!lua flags=allow-oom
--[[
  idle: a node's wake-up token for one queue (lib/common.lua wake_idle). A node with free slots
  whose claim came back short "arms": it registers its id in the queue's idle ZSET, unless work
  arrived in the meantime. The check and the registration are one atomic step, so no wake-up is
  lost between the short claim and the registration: every job made ready after it pops a token.
  A node that was woken but has no free slot "passes" the wake-up on: one idle node per job still
  waiting is woken (so does a resume of a paused queue); a stopping node "leaves".

  KEYS[1]  ready      ZSET    jobq:{q}:ready
  KEYS[2]  scheduled  ZSET    jobq:{q}:scheduled
  KEYS[3]  idle       ZSET    jobq:{q}:idle         member = node id, score = when it armed, ms
  KEYS[4]  paused     STRING  jobq:{q}:paused
  KEYS[5]  guard      NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Idle nodes are woken on the shard channels jobq:{q}:wake:<node>.

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  node     the node's id
  ARGV[3]  now_ms   integer ms, or "" for the Redis server clock
  ARGV[4]  mode     "arm", "pass" or "leave"
  ARGV[5]  known_due  integer ms: the earliest scheduled run time the node knows of (from its
           last claim), -1 = none. arm only.

  Returns: arm: 1 = work is waiting (ready jobs, or a scheduled job due, in a queue that is not
           paused), or a job is scheduled earlier than known_due: claim again (the claim reports
           the earliest run time), no token was registered; 0 = armed (the token is kept where
           it was when the node was already registered). The second case closes a race: a
           scheduled job enqueued between the node's short claim and this call found no token
           to wake, and the node, armed, would not look again before its idle backstop.
           pass: the number of idle nodes woken (one per ready job at most, one for a due
           scheduled job; none when no work is waiting or the queue is paused).
           leave: 1 if a token was removed, else 0.
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(log N): a few reads and one ZADD, ZREM, or ZPOPMIN + SPUBLISH per node tried.
]]
local ready_key, sched_key, idle_key, paused_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local qprefix, node, mode = ARGV[1], ARGV[2], ARGV[4]

local e = bad_counts(5, 5) or bad_qprefix(qprefix) or bad_node(node)
if e then return e end
if idle_key ~= qprefix .. 'idle' then return badarg('keys', 'KEYS[3] must be the idle set') end
local now = now_ms(ARGV[3])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end

if mode == 'leave' then return rcall('ZREM', idle_key, node) end
if mode ~= 'arm' and mode ~= 'pass' then return badarg('mode', 'must be arm, pass or leave') end
local known = int_arg(ARGV[5])
if known == nil or known < -1 then
  return badarg('known_due', 'must be an integer ms >= -1')
end

local paused = rcall('EXISTS', paused_key) == 1
local waiting = 0 -- jobs waiting: the ready ones, else 1 for a due scheduled one
local due = -1 -- the earliest scheduled run time, read when no job is ready
if not paused then
  waiting = rcall('ZCARD', ready_key)
  if waiting == 0 then
    due = next_due(sched_key)
    if due >= 0 and due <= now then waiting = 1 end
  end
end
if mode == 'pass' then
  rcall('ZREM', idle_key, node) -- a node that passes has no free slot: never wake itself
  if waiting == 0 then return 0 end
  return wake_idle(qprefix, waiting, 'r')
end
if waiting > 0 then return 1 end
if due >= 0 and (known < 0 or due < known) then return 1 end
rcall('ZADD', idle_key, 'NX', now, node)
return 0
