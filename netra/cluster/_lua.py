"""The Lua scripts behind leases (see leases.py; _redis.py calls them).

A resource is one sorted set: member = a holder's token, score = when that
token expires, in milliseconds of Redis's own clock. Every script reads that
clock (``TIME``) rather than taking a time from the caller, so nodes whose
clocks disagree still agree on who has expired. A token whose expiry has
passed counts as gone, whether or not a script has swept it out yet: that is
what makes the capacity of a dead node come back by itself.

Each script runs atomically, so "sweep the expired, count, add" cannot
interleave with another node's. They need Redis >= 5 (``TIME`` before a
write). The key of a set expires when its last token would, so a resource
nobody holds leaves nothing behind.
"""

from __future__ import annotations

from typing import Final

_NOW: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

_KEEP_KEY_UNTIL_LAST: Final = """
local function keep_until_last(key)
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if last[2] then
        redis.call('PEXPIREAT', key, last[2])
    end
end
"""

#: KEYS[1] the set; ARGV token, total, ttl_ms, channel, name, then the
#: tokens of this set that the caller's process released and has not sent
#: yet: removed first, so that a release followed at once by an acquire in
#: the same process finds the place free, as with trio.CapacityLimiter.
#: Returns {1, held} when the token was added, else {0, ms until the
#: soonest expiry}: how long a waiter may sleep before a dead holder's
#: token frees a place (a release is announced sooner, on pub/sub).
ACQUIRE: Final = _NOW + _KEEP_KEY_UNTIL_LAST + """
local freed = 0
for i = 6, #ARGV do
    freed = freed + redis.call('ZREM', KEYS[1], ARGV[i])
end
local function announce(count)
    if count > 0 then
        redis.call('PUBLISH', ARGV[4], count .. ' ' .. ARGV[5])
    end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
    keep_until_last(KEYS[1])
    announce(freed - 1)
    return {1, held + 1}
end
announce(freed)
local soonest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if soonest[2] then
    return {0, tonumber(soonest[2]) - now}
end
return {0, 0}
"""

#: KEYS the sets; ARGV ttl_ms, then for each key: a count n and n tokens.
#: Extends each token that is still live; returns the tokens that were not
#: (expired, swept, or taken away), which their holder has lost. A token
#: past its expiry is removed, never revived: its place may already be
#: another's.
REFRESH: Final = _NOW + _KEEP_KEY_UNTIL_LAST + """
local ttl = tonumber(ARGV[1])
local lost = {}
local at = 2
for k = 1, #KEYS do
    local n = tonumber(ARGV[at])
    at = at + 1
    for _ = 1, n do
        local token = ARGV[at]
        at = at + 1
        local expiry = redis.call('ZSCORE', KEYS[k], token)
        if expiry and tonumber(expiry) > now then
            redis.call('ZADD', KEYS[k], now + ttl, token)
        else
            if expiry then
                redis.call('ZREM', KEYS[k], token)
            end
            table.insert(lost, token)
        end
    end
    keep_until_last(KEYS[k])
end
return lost
"""

#: KEYS the sets; ARGV the channel, then for each key: its resource name, a
#: count n and n tokens. Removes the tokens and, for each resource that got
#: places back, publishes "<count> <name>" so that waiters wake at once.
RELEASE: Final = """
local at = 2
local freed = 0
for k = 1, #KEYS do
    local name = ARGV[at]
    local n = tonumber(ARGV[at + 1])
    at = at + 2
    local removed = 0
    for _ = 1, n do
        removed = removed + redis.call('ZREM', KEYS[k], ARGV[at])
        at = at + 1
    end
    if removed > 0 then
        redis.call('PUBLISH', ARGV[1], removed .. ' ' .. name)
        freed = freed + removed
    end
end
return freed
"""

#: KEYS[1] the set. Returns how many tokens are live, on every node.
COUNT: Final = _NOW + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
