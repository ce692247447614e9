"""The Lua scripts :mod:`msdata.adapters.redis.transport` runs on the server.

Each one makes a multi-step change atomic (settle-and-copy, move-due, trim-below-the-floor),
so two consumers racing over the same entry can never both act on it.
"""

from __future__ import annotations

__all__ = [
    "DECLARE_GROUP",
    "FORGET_CONSUMER",
    "FORGET_IDLE_CONSUMERS",
    "HEARTBEAT",
    "MOVE_DUE",
    "MOVE_TOO_LARGE",
    "OWN_PENDING",
    "READ",
    "RECLAIM",
    "SETTLE",
    "TRIM",
]

# KEYS[1] stream; ARGV[1] group, ARGV[2] "first" (the first group of the stream starts at 0,
# later ones at $) or "all" (start at 0). Returns 1 if the group was created.
DECLARE_GROUP = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then groups = {} end
for _, g in ipairs(groups) do
  for i = 1, #g, 2 do
    if g[i] == 'name' and g[i + 1] == ARGV[1] then return 0 end
  end
end
local start = '$'
if ARGV[2] == 'all' or #groups == 0 then start = '0' end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], start, 'MKSTREAM')
return 1
"""

# Settle an entry a consumer holds: ack it and copy it, only if it is still pending at that
# consumer. A settle that reaches Redis late (a slow consumer's, after another consumer took
# the entry over once idle for claim_idle; a close's give-back retried after a silence; a
# command the server ran after the client gave up on it) does nothing: the entry is the
# other consumer's (it counted the attempt) or settled already, and no second copy is made.
# KEYS[1] source stream, KEYS[2] target stream, KEYS[3] delayed set; ARGV[1] group,
# ARGV[2] consumer, ARGV[3] entry id, ARGV[4] delay in ms, ARGV[5..] the copy's fields.
# A delay > 0 parks the copy in the sorted set, scored by the server's clock, until MOVE_DUE.
SETTLE = """
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not ok or not p[1] or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
local delay = tonumber(ARGV[4])
if delay <= 0 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + delay, cmsgpack.pack({KEYS[1], ARGV[3], unpack(ARGV, 5)}))
end
return 1
"""

# KEYS[1] delayed set, KEYS[2] retry stream; ARGV[1] limit.
# Returns {moved, ms until the next one is due or -1}.
MOVE_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local f = cmsgpack.unpack(m)
  redis.call('XADD', KEYS[2], '*', unpack(f, 3))
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {#due, -1} end
return {#due, math.max(0, tonumber(nxt[2]) - now)}
"""

# The shared part of READ, RECLAIM and MOVE_TOO_LARGE: an entry larger than the consumer's
# max_message_bytes is dead-lettered here, on the server, so its bytes never reach the
# consumer. Its size is the sum of its field names' and values' lengths (what XADD was given,
# as RedisTransport.publish counts it). The dead letter is what the consumer's own
# dead_letter would write (msdata.deadletter): the entry's id, body and key, its headers plus
# the four x-msdata-* ones; a foreign entry's id is the stream entry id, its body the
# ``body`` field, else its only field, else a JSON object of its fields, and its headers name
# it foreign (x-msdata-foreign-entry); of two fields of one name, the last counts (as in the
# consumer's _foreign).
# too_large(src, dlq, group, topic, eid, fields, size, attempts, limit, template) returns
# {eid, message id, size, attempts, reason}, or nil if another consumer settled it first.
_TOO_LARGE = """
local function entry_size(f)
  local n = 0
  for j = 1, #f do n = n + #f[j] end
  return n
end
local function attempt_field(f)
  if f[1] ~= 'id' or f[3] ~= 'body' then return 1 end
  for j = 5, #f - 1, 2 do
    if f[j] == 'attempt' then
      local a = tonumber(f[j + 1])
      if a == nil then return 1 end
      return math.min(math.max(math.floor(a), 1), 1000000)
    end
  end
  return 1
end
local function too_large(src, dlq, group, topic, eid, f, size, attempts, limit, template)
  if redis.call('XACK', src, group, eid) == 0 then return nil end
  local reason = string.format(template, size, limit)
  local id, body, key, headers = eid, nil, nil, nil
  if f[1] == 'id' and f[3] == 'body' and #f % 2 == 0 then
    id, body, headers = f[2], f[4], {}
    for j = 5, #f - 1, 2 do
      if f[j] == 'key' then
        key = f[j + 1]
      elseif f[j] == 'headers' and headers ~= nil then
        local ok, h = pcall(cjson.decode, f[j + 1])
        if ok and type(h) == 'table' then
          for k, v in pairs(h) do
            if type(k) ~= 'string' or type(v) ~= 'string' then headers = nil; break end
            headers[k] = v
          end
        else
          headers = nil
        end
      end
    end
  end
  if headers == nil then
    id, key, headers = eid, nil, {['x-msdata-foreign-entry'] = eid}
    body = nil
    local fields, n = {}, 0
    for j = 1, #f - 1, 2 do
      n = n + 1
      fields[f[j]] = f[j + 1]
      if f[j] == 'body' then body = f[j + 1] end
    end
    if body == nil then
      if n == 1 then body = f[2] else body = cjson.encode(fields) end
    end
  end
  headers['x-msdata-dead-letter-reason'] = reason
  headers['x-msdata-original-topic'] = topic
  headers['x-msdata-group'] = group
  headers['x-msdata-attempts'] = tostring(attempts)
  local copy = {'XADD', dlq, '*', 'id', id, 'body', body}
  if key ~= nil then copy[#copy + 1] = 'key'; copy[#copy + 1] = key end
  copy[#copy + 1] = 'headers'
  copy[#copy + 1] = cjson.encode(headers)
  redis.call(unpack(copy))
  if #id > 200 then id = eid end
  return {eid, id, size, attempts, reason}
end
"""

# Ack, then read: the consumer's batched acks go out with its next read, in one round trip.
# KEYS[1] topic stream, KEYS[2] retry stream, KEYS[3] the group's dead-letter stream;
# ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] max_message_bytes, ARGV[5] topic,
# ARGV[6] the too-large reason (a format of size and limit), ARGV[7] n, ARGV[8..7+n] ids to
# ack on the topic stream, ARGV[8+n..] ids to ack on the retry stream.
# Reads at most ``count`` new entries, the retry stream's first (a retry does not wait behind
# the backlog), without blocking. Returns {retry entries, topic entries, too large}.
READ = (
    _TOO_LARGE
    + """
local group, consumer = ARGV[1], ARGV[2]
local left, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local nt = tonumber(ARGV[7])
local function xack(key, first, last)
  while first <= last do
    local upto = math.min(first + 999, last)
    redis.call('XACK', key, group, unpack(ARGV, first, upto))
    first = upto + 1
  end
end
xack(KEYS[1], 8, 7 + nt)
xack(KEYS[2], 8 + nt, #ARGV)
local out = {{}, {}, {}}
local function read(i, key, own)
  if left <= 0 then return end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left, 'STREAMS', key, '>')
  if not r then return end
  local keep = out[i]
  for _, e in ipairs(r[1][2]) do
    local f = e[2]
    local size = entry_size(f)
    if size > limit then
      local attempts = 1
      if own then attempts = attempt_field(f) end
      local moved = too_large(key, KEYS[3], group, ARGV[5], e[1], f, size, attempts, limit, ARGV[6])
      if moved then out[3][#out[3] + 1] = moved end
    else
      keep[#keep + 1] = e
    end
    left = left - 1
  end
end
read(1, KEYS[2], true)
read(2, KEYS[1], false)
return out
"""
)

# Dead-letter one entry the consumer read (a blocking read cannot run in a script) and found
# too large, copying it on the server. KEYS[1] stream, KEYS[2] dead-letter stream; ARGV[1]
# group, ARGV[2] entry id, ARGV[3] attempts, ARGV[4] max_message_bytes, ARGV[5] topic,
# ARGV[6] reason format. Returns what too_large does, or nil.
MOVE_TOO_LARGE = (
    _TOO_LARGE
    + """
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #e == 0 then return nil end
local f = e[1][2]
return too_large(KEYS[1], KEYS[2], ARGV[1], ARGV[5], ARGV[2], f, entry_size(f),
                 tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[6])
"""
)

# XAUTOCLAIM plus each claimed entry's delivery count (XAUTOCLAIM does not return it); a
# claimed entry over max_message_bytes is dead-lettered here (see _TOO_LARGE).
# KEYS[1] stream, KEYS[2] the group's dead-letter stream; ARGV[1] group, ARGV[2] consumer,
# ARGV[3] min idle ms, ARGV[4] cursor, ARGV[5] count, ARGV[6] max_message_bytes, ARGV[7]
# topic, ARGV[8] reason format, ARGV[9] "1" if the stream is a retry stream (its entries'
# attempt field is msdata's). Returns {next cursor, entries, counts, too large, own}: own[i]
# is 1 if entries[i] was already this consumer's (the claim counted one more delivery).
RECLAIM = (
    _TOO_LARGE
    + """
-- this consumer's own idle entries from the cursor on: XAUTOCLAIM claims the first COUNT
-- idle entries, so its own among them are among these
local mine = {}
for _, e in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[4], '+',
                              ARGV[5], ARGV[2])) do
  mine[e[1]] = true
end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     'COUNT', ARGV[5])
local limit = tonumber(ARGV[6])
local entries, counts, large, own = {}, {}, {}, {}
for _, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  local count = 1
  if p[1] then count = p[1][4] end
  local f = e[2]
  local size = 0
  if f then size = entry_size(f) end
  if size > limit then
    local base = 1
    if ARGV[9] == '1' then base = attempt_field(f) end
    local moved = too_large(KEYS[1], KEYS[2], ARGV[1], ARGV[7], e[1], f, size,
                            base + count - 1, limit, ARGV[8])
    if moved then large[#large + 1] = moved end
  else
    entries[#entries + 1] = e
    counts[#counts + 1] = count
    if mine[e[1]] then own[#own + 1] = 1 else own[#own + 1] = 0 end
  end
end
return {r[1], entries, counts, large, own}
"""
)

# Reset the idle time of the entries this consumer still owns, so a live consumer with a slow
# handler is not taken for dead. KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] ids.
HEARTBEAT = """
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then claim[#claim + 1] = ARGV[i] end
end
if #claim == 5 then return 0 end
claim[#claim + 1] = 'JUSTID'
return #redis.call(unpack(claim))
"""

# Remove a consumer from its group only if it holds nothing, so no pending entry is dropped.
# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer.
FORGET_CONSUMER = """
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #p > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# What one consumer holds (read and not acked), for its close to give back: a read cut short
# by the close reached Redis but not the consumer; or, from ARGV[4] on (an XPENDING start such
# as "(1700000000000-3", exclusive), what a read whose reply was lost took. KEYS[1] stream;
# ARGV[1] group, ARGV[2] consumer, ARGV[3] count. Returns {entries ({id, fields} each),
# delivery counts}; an entry deleted from the stream meanwhile is acked (nothing is left);
# the idle time of those returned is reset.
OWN_PENDING = """
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[4] or '-', '+',
                    tonumber(ARGV[3]), ARGV[2])
if not ok then return {{}, {}} end
local entries, counts = {}, {}
for _, e in ipairs(p) do
  local r = redis.call('XRANGE', KEYS[1], e[1], e[1])
  if r[1] then
    entries[#entries + 1] = r[1]
    counts[#counts + 1] = e[4]
  else
    redis.call('XACK', KEYS[1], ARGV[1], e[1])
  end
end
if #entries > 0 then
  -- taken up now: their idle time starts again (JUSTID: no delivery is counted), so no other
  -- consumer takes them over meanwhile
  local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for _, e in ipairs(entries) do claim[#claim + 1] = e[1] end
  claim[#claim + 1] = 'JUSTID'
  redis.call(unpack(claim))
end
return {entries, counts}
"""

# Remove the consumers (of crashed processes) that hold nothing and have been idle longer than
# ARGV[2] ms; a live one that is removed comes back with its next read. KEYS[1] stream;
# ARGV[1] group. Returns how many were removed.
FORGET_IDLE_CONSUMERS = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local removed = 0
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""

# Trim below the floor no group still needs: the minimum over the stream's groups of the
# oldest pending id (or, with nothing pending, the last delivered id). A stream without
# groups is kept whole (its first group receives it). KEYS[1] stream; ARGV[1] '=' or '~'.
TRIM = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then return 0 end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local floor, fms, fseq = nil, 0, 0
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local mark = info['last-delivered-id']
  if info['pending'] > 0 then
    mark = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  local ms, seq = parse(mark)
  if floor == nil or ms < fms or (ms == fms and seq < fseq) then
    floor, fms, fseq = mark, ms, seq
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1], floor)
"""
