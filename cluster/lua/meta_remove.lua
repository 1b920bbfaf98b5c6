-- Remove one connection's meta from one channel if the entry is the node's.
-- Returns 1 when removed, 2 when removed and the channel has no member left
-- (channel.vacated), 0 when there was none (already removed: its leave may be
-- published again, harmlessly), -1 when another node owns it (resumed there: no leave).
-- KEYS[1] presence:ch:{ch}:metas   hash user\0conn -> msgpack [user, node, meta]
-- ARGV[1] field (user\0conn)
-- ARGV[2] node
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then
    return 0
end
if cmsgpack.unpack(old)[2] ~= ARGV[2] then
    return -1
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
    return 2
end
return 1
