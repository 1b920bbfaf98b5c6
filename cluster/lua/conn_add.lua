-- Record a live connection of a user and return the user's connection count. A
-- connection recorded as another node's (resumed there) is left alone.
-- KEYS[1] presence:user:{u}:conns    hash conn -> node
-- KEYS[2] presence:user:{u}:resume   hash conn -> resume hash
-- ARGV[1] conn
-- ARGV[2] node
-- ARGV[3] resume hash ('' keeps the one there)
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if not owner or owner == ARGV[2] then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    if ARGV[3] ~= '' then
        redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
    end
end
return redis.call('HLEN', KEYS[1])
