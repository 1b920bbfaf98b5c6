-- Write one connection's meta in one channel, unless another node owns the entry (the
-- connection was resumed there). Returns 1 when written, 2 when written into a
-- channel that had no member (channel.occupied), 0 when left alone. With ARGV[4] and
-- ARGV[5], a write also publishes the join ARGV[5] on the channel's sharded pub/sub
-- channel ARGV[4] (same hash tag, so same slot): one round trip instead of two, and
-- no join is published for a write that did not happen.
-- KEYS[1] presence:ch:{ch}:metas   hash user\0conn -> msgpack [user, node, meta]
-- ARGV[1] field (user\0conn)
-- ARGV[2] node
-- ARGV[3] the new value, msgpack [user, node, meta]
-- ARGV[4] optional: presence:ch:{ch}:bus
-- ARGV[5] optional: the join to publish there
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and cmsgpack.unpack(old)[2] ~= ARGV[2] then
    return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[5] then
    redis.call('SPUBLISH', ARGV[4], ARGV[5])
end
if not old and redis.call('HLEN', KEYS[1]) == 1 then
    return 2
end
return 1
