-- Forget a connection of a node (its record, resume hash and channel set), unless it
-- is recorded as another node's (resumed there: -1, RESUMED_ELSEWHERE in
-- cluster/base.py). Returns the user's connections left (0: the user went offline),
-- or nil for a connection not recorded.
-- KEYS[1] presence:user:{u}:conns         hash conn -> node
-- KEYS[2] presence:user:{u}:resume        hash conn -> resume hash
-- KEYS[3] presence:user:{u}:chans:<conn>  set of channels
-- ARGV[1] conn
-- ARGV[2] node
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and owner ~= ARGV[2] then
    return -1
end
if not owner then  -- unknown (or its record was lost): clear what may be left
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('DEL', KEYS[3])
    return false
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return redis.call('HLEN', KEYS[1])
