-- Forget a connection of a node (its record, resume hash and channel set), unless it
-- is recorded as another node's (resumed there). Returns 1 when forgotten.
-- KEYS[1] presence:user:{u}:conns         hash conn -> node
-- KEYS[2] presence:user:{u}:resume        hash conn -> resume hash
-- KEYS[3] presence:user:{u}:chans:<conn>  set of channels
-- ARGV[1] conn
-- ARGV[2] node
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and owner ~= ARGV[2] then
    return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
