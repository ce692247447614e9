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

# Ack an entry and, only if it was still pending (so nobody settled it first), copy it.
# KEYS[1] source stream, KEYS[2] target stream, KEYS[3] delayed set;
# ARGV[1] group, ARGV[2] entry id, ARGV[3] delay in ms, ARGV[4..] the copy's fields.
# A delay > 0 parks the copy in the sorted set, scored by the server's clock, until MOVE_DUE.
SETTLE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local delay = tonumber(ARGV[3])
if delay <= 0 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + delay, cmsgpack.pack({KEYS[1], ARGV[2], unpack(ARGV, 4)}))
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

# XAUTOCLAIM plus each claimed entry's delivery count (XAUTOCLAIM does not return it).
# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms, ARGV[4] cursor,
# ARGV[5] count. Returns {next cursor, entries, counts}.
RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     'COUNT', ARGV[5])
local counts = {}
for i, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  if p[1] then counts[i] = p[1][4] else counts[i] = 1 end
end
return {r[1], r[2], counts}
"""

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
