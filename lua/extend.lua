#!lua flags=allow-oom
--[[
  extend: the heartbeat of one node on one queue. Renews the lease of every job still in the
  node's active set (so a job whose lease was reaped is not renewed: it is no longer in the
  set) and records the node as alive for this queue. Returns the ids the node owns, each with
  the fence token of the claim that holds it (its score in the active set, claim.lua), so the
  caller can tell which of its running jobs it lost (the id is not owned, or is owned by a newer
  claim: a run whose token differs is an older claim's), and which claimed jobs it does not know of
  (a claim whose reply was lost) and must release; and the ids of this node's jobs cancelled
  while they ran (cancel.lua marks them in KEYS[4]): the fallback of the cancel notice, which a
  node cut off from Redis misses. A mark stays until the node names it in a later renewal
  (ARGV[5], the marks its last reply carried), so a lost reply loses none. Allowed under OOM.

  KEYS[1]  active  ZSET  jobq:{q}:active:<node>   member = job id, score = fence token
  KEYS[2]  leases  ZSET  jobq:{q}:leases
  KEYS[3]  nodes   ZSET  jobq:{q}:nodes         member = node id, score = last heartbeat ms
  KEYS[4]  marks   SET   jobq:{q}:cancels:<node>  this node's jobs cancelled while they ran

  ARGV[1]  node      the node's id
  ARGV[2]  now_ms    integer ms, or "" for the Redis server clock
  ARGV[3]  lease_ms  integer > 0
  ARGV[4]  limit     integer 1..5000, most ids renewed per call
  ARGV[5]  seen      "" or the cancelled ids (space-separated, at most 5000) the node has heard
                     of from an earlier reply: their marks are removed

  Returns: {now_ms, {id, token, id, token...}, {cancelled ids...}}: each owned id with the fence
           token of the claim that holds it (none for an entry converted from an older jobq's list:
           0 or the conversion time),
           as ZRANGE WITHSCORES gives them (no copy).
  Errors:  "BADARG <field> <reason>" (nothing written).
  Cost:    O(min(A, limit) * log N).
]]
local active_key, leases_key, nodes_key, marks_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local node = ARGV[1]

local e = bad_counts(4, 5) or bad_node(node)
if e then return e end
if string.sub(active_key, -(#node + 8)) ~= ':active:' .. node then
  return badarg('node', 'does not match KEYS[1]')
end
if string.sub(marks_key, -(#node + 9)) ~= ':cancels:' .. node then
  return badarg('node', 'does not match KEYS[4]')
end
local now = now_ms(ARGV[2])
if now == nil then return badarg('now_ms', 'not a non-negative integer') end
local lease = int_arg(ARGV[3])
if lease == nil or lease <= 0 then return badarg('lease_ms', 'must be an integer > 0') end
local limit = int_arg(ARGV[4])
if limit == nil or limit < 1 or limit > 5000 then return badarg('limit', 'must be 1..5000') end
local seen = {}
for id in string.gmatch(ARGV[5], '%S+') do
  e = bad_id(id); if e then return e end
  seen[#seen + 1] = id
  if #seen > 5000 then return badarg('seen', 'at most 5000 ids') end
end

-- Only jobs still in this node's set are renewed: a reaped job left the set, so a node that
-- lost a lease cannot take it back by renewing.
local owned = rcall('ZRANGE', active_key, 0, limit - 1, 'WITHSCORES')
local deadline = now + lease
-- One ZADD per 1,000 ids (also repairs an active entry that lost its lease entry); owned is
-- id, token pairs.
for first = 1, #owned, 2000 do
  local add = {}
  for i = first, math.min(first + 1998, #owned - 1), 2 do
    add[#add + 1] = deadline; add[#add + 1] = owned[i]
  end
  rcall('ZADD', leases_key, unpack(add))
end
rcall('ZADD', nodes_key, now, node)
-- Jobs of this node cancelled while they ran (at most one per job it held: bounded); the marks
-- the node has heard of go first.
for first = 1, #seen, 1000 do
  rcall('SREM', marks_key, unpack(seen, first, math.min(first + 999, #seen)))
end
local cancelled = rcall('SMEMBERS', marks_key)
return {now, owned, cancelled}
