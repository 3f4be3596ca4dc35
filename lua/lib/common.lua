--[[
  common: the prelude every operation script shares. jobq/scripts.py loads each lua/<op>.lua and
  inserts this file's text right after the op's first line (its "#!lua" shebang), so each script
  Redis runs is still one static text made only of files shipped in the package (no string built
  from data, no loadstring). Only local definitions here: no Redis call runs at load.

  Conventions shared by every script:
  - Arguments are validated before the first write (Redis never rolls a script back); a refused
    call returns the error "BADARG <field> <reason>" and writes nothing.
  - Integers cross ARGV as plain decimal strings ("-12", "1700000000000"), at most 2^53 - 1 in
    magnitude, so every score and time is exact in Lua's doubles.
  - now_ms is an ARGV: an integer, or "" for the Redis server clock (TIME).
]]
local rcall = redis.call
--: The largest integer Lua's doubles hold exactly (2^53 - 1).
local MAX_INT = 9007199254740991
--: Most payload (enqueue, claim) or result (ack) bytes one call carries, unless it carries one
--: job only: a batch of large jobs is split over several calls (jobq/store.py MAX_BATCH_BYTES),
--: so that copying them stays a small part of a call's ~10 ms bound.
local MAX_BATCH_BYTES = 2097152
--: Ready score = (100 - priority) * PRIO_SPAN + seq: room for 2^44 sequence numbers under each
--: of the 201 priorities, and 200 * 2^44 + 2^44 < 2^53.
local PRIO_SPAN = 17592186044416
--: A payload longer than PAYLOAD_PART bytes is stored in parts of that size (enqueue.lua),
--: up to PAYLOAD_PARTS_MAX parts; claim puts it back together (see below).
local PAYLOAD_PART = 64
local PAYLOAD_PARTS_MAX = 64

local function badarg(field, why)
  return redis.error_reply('BADARG ' .. field .. ' ' .. why)
end

-- An integer argument: a canonical decimal string within +/- MAX_INT, else nil. Refuses "1e3",
-- "0x10", " 5", "5.0", "nan", "inf" (tonumber alone would take several of them) and leading
-- zeros ("007", "-0"), so a valid argument's text is exactly the integer's decimal form and a
-- script may store it as given instead of formatting the number again.
local function int_arg(v)
  if v == '0' then return 0 end
  if type(v) ~= 'string' or #v == 0 or #v > 17 or not string.find(v, '^%-?[1-9]%d*$') then
    return nil
  end
  local n = tonumber(v)
  if n == nil or n > MAX_INT or n < -MAX_INT then return nil end
  return n
end

-- The current time in ms: the given integer, or the Redis server clock for "". nil = invalid.
local function now_ms(arg)
  if arg == '' then
    local t = rcall('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  local n = int_arg(arg)
  if n == nil or n < 0 then return nil end
  return n
end

-- An exact integer as the string Redis stores (no exponent).
local function fmt_int(n)
  return string.format('%.0f', n)
end

local function ready_score(prio, seq)
  return fmt_int((100 - prio) * PRIO_SPAN + seq)
end

-- The queue's key prefix "jobq:{q}:" must be the prefix of KEYS[1]: every key a script builds
-- from it then stays inside the queue's hash tag (same cluster slot) and inside jobq's key space.
--
-- Every script that builds keys from it also declares, as its last KEYS entry, the queue's slot
-- guard "jobq:{q}:slot-guard", a key that is never created. Redis Cluster decides where a script
-- runs from its declared keys alone; while a slot is half moved to another primary, a script on
-- the source could then find a job key already moved (an error after its first writes), and one
-- on the target could miss a job key not yet moved and write its own (MIGRATE then stops with
-- BUSYKEY). A declared key that is missing makes Redis refuse the script on both sides of a
-- moving slot before it starts (TRYAGAIN, or ASK and then TRYAGAIN), so no such script runs
-- until the move is done. Outside a move the guard costs nothing; Redis without cluster mode
-- ignores it.
local function bad_qprefix(qprefix)
  if type(qprefix) ~= 'string' or #qprefix < 4 or string.sub(qprefix, -2) ~= '}:'
    or not string.find(qprefix, '{', 1, true)
    or string.sub(KEYS[1], 1, #qprefix) ~= qprefix then
    return badarg('qprefix', 'must be the queue key prefix of KEYS[1]')
  end
  if KEYS[#KEYS] ~= qprefix .. 'slot-guard' then
    return badarg('keys', 'the last key must be the queue slot guard')
  end
  return nil
end

-- Exact KEYS and ARGV counts (fixed-size scripts); nil when they match.
local function bad_counts(nkeys, nargs)
  if #KEYS ~= nkeys then return badarg('keys', 'expected ' .. nkeys .. ' keys') end
  if #ARGV ~= nargs then return badarg('argv', 'expected ' .. nargs .. ' values, got ' .. #ARGV) end
  return nil
end

-- A node id: 1..128 characters, no whitespace, control characters, braces or colons.
local function bad_node(node)
  if type(node) ~= 'string' or #node == 0 or #node > 128 or string.find(node, '[%s%c{}:]') then
    return badarg('node', 'must be 1..128 characters without spaces, braces or colons')
  end
  return nil
end

-- A job id: 1..128 characters, no whitespace, control characters or braces.
local function bad_id(id)
  if type(id) ~= 'string' or #id == 0 or #id > 128 then return badarg('id', 'invalid job id') end
  -- Fast path: an id of letters and digits only (every generated id) needs no further check.
  if not string.find(id, '^%w+$') and string.find(id, '[%s%c{}]') then
    return badarg('id', 'invalid job id')
  end
  return nil
end

--: Lifecycle events (docs/events.md): the queue's stream "<qprefix>events" and its length cap,
--: set by bad_events; a cap of 0 (also before bad_events ran) writes no event.
local events_key, events_cap = nil, 0

-- The events arguments of a script that writes events: the key just before the slot guard,
-- KEYS[#KEYS - 1], must be the queue's stream "<qprefix>events", and the last value, ARGV[#ARGV],
-- its length cap, an integer >= 0 (0 = this queue writes no events). Checked with the other
-- arguments, before the first write.
local function bad_events(qprefix)
  local cap = int_arg(ARGV[#ARGV])
  if KEYS[#KEYS - 1] ~= qprefix .. 'events' then
    return badarg('keys', 'the key before the slot guard must be the events stream')
  end
  if cap == nil or cap < 0 then return badarg('events_max', 'must be an integer >= 0') end
  events_key, events_cap = KEYS[#KEYS - 1], cap
  return nil
end

-- Append one lifecycle event to the queue's stream: its type, the job id, the time (ms of the
-- clock the script uses), then the given field/value pairs (strings). Trimmed with MAXLEN ~,
-- which drops whole stream nodes only (cheap; up to one node, 100 entries by default, over
-- the cap). Written by the script that makes the change, so an event is never written for a
-- change that did not happen, and never missing for one that did. Nothing when the cap is 0.
local function emit(etype, id, now, ...)
  if events_cap > 0 then
    rcall('XADD', events_key, 'MAXLEN', '~', events_cap, '*', 'type', etype, 'id', id,
      't', fmt_int(now), ...)
  end
end

-- Release a job's unique key if this job still holds it.
local function release_unique(qprefix, id, unique)
  if unique then
    local ukey = qprefix .. 'unique:' .. unique
    if rcall('GET', ukey) == id then rcall('DEL', ukey) end
  end
end

--: Dead letters this script call deleted because the list was over dead_max (not for age): each
--: script that dead-letters reports it in its reply, so the caller can count and log them.
local dead_trimmed = 0

-- Is the job hash at jkey the incarnation an index entry (id, score) names? A job id can be used
-- again once its hash is gone (a dead hash expires after dead_ttl, a finished one after its
-- retention), while its old index entry is still waiting to be trimmed; the entry must then not
-- take the new job's hash with it. `states`: the states the index holds (a set); `exact`: the
-- score is the job's finished_ms (dead), else its expiry, at or after finished_ms (finished).
local function same_incarnation(jkey, score, states, exact)
  local ok, f = pcall(rcall, 'HMGET', jkey, 'state', 'finished_ms')
  if not ok or not f[1] or not states[f[1]] then return false end
  local fin, sc = tonumber(f[2] or ''), tonumber(score)
  if fin == nil or sc == nil then return false end
  if exact then return fin == sc end
  return fin <= sc
end
local DEAD_STATES = {dead = true}
local FINISHED_STATES = {done = true, cancelled = true}

-- Drop one dead-letter entry, and its job hash if the entry still names it (same_incarnation).
local function drop_dead(qprefix, dead_key, id, score)
  local jkey = qprefix .. 'job:' .. id
  if same_incarnation(jkey, score, DEAD_STATES, true) then rcall('DEL', jkey) end
  rcall('ZREM', dead_key, id)
end

-- Keep a queue's dead-letter list bounded: at most dead_max entries (the oldest go first), and
-- none older than dead_ttl; at most `limit` entries of each kind are removed per call, so a long
-- backlog (dead_max lowered, a burst of deaths) is trimmed over the following calls. Trimmed jobs
-- are deleted, unless the id now names a newer job (drop_dead); the ones removed for the count
-- bound are added to dead_trimmed.
local function trim_dead(qprefix, dead_key, now, dead_max, dead_ttl, limit)
  local excess = rcall('ZCARD', dead_key) - dead_max
  if excess > 0 then
    local old = rcall('ZRANGE', dead_key, 0, math.min(excess, limit) - 1, 'WITHSCORES')
    for i = 1, #old, 2 do drop_dead(qprefix, dead_key, old[i], old[i + 1]) end
    dead_trimmed = dead_trimmed + #old / 2
  end
  local aged = rcall('ZRANGEBYSCORE', dead_key, '-inf', now - dead_ttl,
    'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #aged, 2 do drop_dead(qprefix, dead_key, aged[i], aged[i + 1]) end
end

-- Move a job to the dead-letter list with a reason, release its unique key, write the "dead"
-- event (the reason cut to 200 bytes), and trim the list.
-- The job hash expires after dead_ttl on its own too (retry_dead makes it permanent again), so a
-- dead job never outlives its age bound even when nothing trims the list. A job key of a foreign
-- type is left alone; the id is still listed so it is seen.
local function to_dead(qprefix, dead_key, id, reason, now, dead_max, dead_ttl)
  local jkey = qprefix .. 'job:' .. id
  local jtype = rcall('TYPE', jkey)['ok']
  local task, attempt = '', '0'
  if jtype == 'hash' then
    local f = rcall('HMGET', jkey, 'unique', 'task', 'attempts')
    release_unique(qprefix, id, f[1])
    task, attempt = f[2] or '', f[3] or '0'
    rcall('HSET', jkey, 'state', 'dead', 'error', reason, 'finished_ms', now)
    rcall('HDEL', jkey, 'node')
    rcall('PEXPIRE', jkey, dead_ttl)
  elseif jtype == 'none' then
    rcall('HSET', jkey, 'state', 'dead', 'error', reason, 'finished_ms', now)
    rcall('PEXPIRE', jkey, dead_ttl)
  end
  rcall('ZADD', dead_key, now, id)
  emit('dead', id, now, 'task', task, 'attempt', attempt, 'error', string.sub(reason, 1, 200))
  trim_dead(qprefix, dead_key, now, dead_max, dead_ttl, 10)
end

-- Promote up to `limit` due scheduled jobs (run-at <= now) to ready, each behind the ready jobs
-- of its priority (a fresh sequence number). Returns how many moved.
local function promote_due(qprefix, sched_key, ready_key, seq_key, now, limit)
  if limit <= 0 then return 0 end
  local due = rcall('ZRANGEBYSCORE', sched_key, '-inf', now, 'LIMIT', 0, limit)
  if #due == 0 then return 0 end
  local seq = rcall('INCRBY', seq_key, #due) - #due
  -- The moves are written with one ZREM and one ZADD; per job one HGET and one HSET.
  local add = {}
  for _, id in ipairs(due) do
    seq = seq + 1
    local jkey = qprefix .. 'job:' .. id
    local ok, prio = pcall(rcall, 'HGET', jkey, 'priority')
    if not ok then prio = false end
    local score = ready_score(tonumber(prio or '0') or 0, seq)
    add[#add + 1] = score; add[#add + 1] = id
    if ok and prio then rcall('HSET', jkey, 'state', 'ready', 'ready_ms', now, 'score', score) end
    emit('promoted', id, now)
  end
  rcall('ZREM', sched_key, unpack(due))
  rcall('ZADD', ready_key, unpack(add))
  return #due
end

-- A job's payload from its "payload" field and, when the hash has "parts" = k > 1, the fields
-- "p2" .. "p<k>" (enqueue.lua). A job stored before parts existed has no "parts".
local function read_payload(jkey, first, parts)
  local k = tonumber(parts or '')
  if first == nil or first == false or k == nil or k < 2 then return first or '' end
  local names = {}
  for part = 2, k do names[part - 1] = 'p' .. part end
  local rest = rcall('HMGET', jkey, unpack(names))
  for i = 1, #rest do rest[i] = rest[i] or '' end
  return first .. table.concat(rest)
end

-- The earliest scheduled run-at in ms, or -1 when nothing is scheduled.
local function next_due(sched_key)
  local first = rcall('ZRANGE', sched_key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return -1
end
-- Wake up to `n` idle nodes of the queue, one per token. A node with free slots that found the
-- queue empty registers a token (its id) in the ZSET <qprefix>idle (idle.lua, score = when) and
-- listens on its own shard channel <qprefix>wake:<node>. Each token is popped (oldest first) and
-- its node told `msg` with SPUBLISH, which stays on the queue's shard in Redis Cluster and
-- returns how many clients heard it: 0 means the node is gone (or reconnecting, and it looks at
-- the queue once it is back), so the next token is tried. Nothing is sent when no node is idle:
-- the nodes that are busy claim again when a slot frees up. Returns the number of nodes woken.
local function wake_idle(qprefix, n, msg)
  local idle = qprefix .. 'idle'
  local woken, tries = 0, 0
  while woken < n and tries < n + 64 do
    local t = rcall('ZPOPMIN', idle)
    if t[1] == nil then break end
    tries = tries + 1
    if rcall('SPUBLISH', qprefix .. 'wake:' .. t[1], msg) > 0 then woken = woken + 1 end
  end
  return woken
end
-- end of common prelude
