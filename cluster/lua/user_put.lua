-- The user-side records of a meta write: the user's index (last meta per conn) and the
-- connection's channel set, unless the connection is another node's (resumed there).
-- KEYS[1] presence:user:{u}:conns         hash conn -> node
-- KEYS[2] presence:user:{u}:index         hash conn -> msgpack meta
-- KEYS[3] presence:user:{u}:chans:<conn>  set of channels
-- ARGV[1] conn
-- ARGV[2] node
-- ARGV[3] msgpack meta (the last one written)
-- ARGV[4..] channels
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and owner ~= ARGV[2] then
    return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if #ARGV >= 4 then
    redis.call('SADD', KEYS[3], unpack(ARGV, 4))
end
return 1
