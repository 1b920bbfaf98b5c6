-- Remove one connection's meta from one channel if the entry is the node's.
-- Returns 1 when removed, 0 when there was none (already removed: its leave may be
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
return 1
