-- Claim a dead node's ownership records for one sweeper (exactly once per claim).
-- Returns 1 when this caller now owns the sweep, 0 when the node's lease is alive,
-- another sweeper's claim holds, or the node owns nothing.
-- The records are renamed to the sweep keys, so a node that comes back starts afresh;
-- the sweep keys stay until the sweeper has published the leaves (sweep_done). A claim
-- not finished by its deadline (a sweeper that died) is taken over by the next one,
-- which gets the same records again plus any the node wrote since.
-- The lease key is dropped: the node's next refresh must see that it was swept.
-- KEYS[1] presence:node:{n}:lease         lease expiry ms
-- KEYS[2] presence:node:{n}:metas         set of msgpack [ch, user, conn]
-- KEYS[3] presence:node:{n}:conns         set of msgpack [user, conn]
-- KEYS[4] presence:node:{n}:sweep:metas
-- KEYS[5] presence:node:{n}:sweep:conns
-- KEYS[6] presence:node:{n}:sweep:lock    "<token>:<deadline ms>"
-- ARGV[1] now (ms)
-- ARGV[2] sweeper token
-- ARGV[3] claim lifetime (ms)
local now = tonumber(ARGV[1])
local lease = redis.call('GET', KEYS[1])
if lease and tonumber(lease) >= now then
    return 0
end
local lock = redis.call('GET', KEYS[6])
if lock then
    local deadline = tonumber(string.match(lock, ':(%d+)$'))
    if deadline and deadline > now then
        return 0
    end
end
if redis.call('EXISTS', KEYS[2], KEYS[3], KEYS[4], KEYS[5]) == 0 then
    return 0
end
for i = 2, 3 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
        if redis.call('EXISTS', KEYS[i + 2]) == 1 then
            redis.call('SUNIONSTORE', KEYS[i + 2], KEYS[i + 2], KEYS[i])
            redis.call('DEL', KEYS[i])
        else
            redis.call('RENAME', KEYS[i], KEYS[i + 2])
        end
    end
end
redis.call('DEL', KEYS[1])
-- PX only cleans up: the deadline in the value decides (by the callers' clocks).
redis.call('SET', KEYS[6], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])),
           'PX', 2 * tonumber(ARGV[3]))
return 1
