#!lua flags=allow-oom
--[[
  promote: move due scheduled jobs (run-at <= now) to ready, each behind the ready jobs of its
  priority, and announce them. Bounded by limit; the caller loops while a full batch moved.

  KEYS[1]  scheduled  ZSET    jobq:{q}:scheduled
  KEYS[2]  ready      ZSET    jobq:{q}:ready
  KEYS[3]  seq        STRING  jobq:{q}:seq
  KEYS[4]  events     STREAM  jobq:{q}:events       "promoted" per job (lib/common.lua promote_due)
  KEYS[5]  guard      NONE    jobq:{q}:slot-guard   never created: the slot guard (lib/common.lua)
  Keys built here, inside the queue's hash tag: jobq:{q}:job:<id>, jobq:{q}:idle; idle nodes are
  woken on jobq:{q}:wake:<node> (lib/common.lua wake_idle).

  ARGV[1]  qprefix  "jobq:{q}:"
  ARGV[2]  now_ms   integer ms, or "" for the Redis server clock
  ARGV[3]  limit    integer 1..1000
  ARGV[4]  events_max  integer >= 0, the events stream's length cap (0 = no events)

  Returns: {n_promoted, next_due_ms (-1 = none), now_ms}
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(limit * log N).
]]
local sched_key, ready_key, seq_key = KEYS[1], KEYS[2], KEYS[3]
local qprefix = ARGV[1]

local e = bad_counts(5, 4) or bad_qprefix(qprefix) or bad_events(qprefix)
if e then return e end
local now = now_ms(ARGV[2])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local limit = int_arg(ARGV[3])
if limit == nil or limit < 1 or limit > 1000 then return badarg('limit', 'must be 1..1000') end

local moved = promote_due(qprefix, sched_key, ready_key, seq_key, now, limit)
if moved > 0 then wake_idle(qprefix, moved, 'r') end
return {moved, next_due(sched_key), now}
