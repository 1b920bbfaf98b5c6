-- Claim a dead node's ownership records for one sweeper (exactly once).
-- Returns 1 when this caller now owns the sweep, 0 when the node's lease is alive,
-- another sweeper holds the lock, or the node owns nothing.
-- The records are renamed to the sweep keys, so a node that comes back starts afresh;
-- leftovers of a sweeper that died mid-sweep (lock expired) are taken over by the next.
-- KEYS[1] presence:node:{n}:lease         lease expiry ms
-- KEYS[2] presence:node:{n}:metas         set of msgpack [ch, user, conn]
-- KEYS[3] presence:node:{n}:conns         set of msgpack [user, conn]
-- KEYS[4] presence:node:{n}:sweep:metas
-- KEYS[5] presence:node:{n}:sweep:conns
-- KEYS[6] presence:node:{n}:sweep:lock
-- ARGV[1] now (ms)
-- ARGV[2] sweeper token
-- ARGV[3] lock lifetime (ms)
local lease = redis.call('GET', KEYS[1])
if lease and tonumber(lease) >= tonumber(ARGV[1]) then
    return 0
end
if redis.call('EXISTS', KEYS[6]) == 1 then
    return 0
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
redis.call('SET', KEYS[6], ARGV[2], 'PX', ARGV[3])
return 1
