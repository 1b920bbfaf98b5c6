-- A connection left presence channels: drop them from its channel set; when it left
-- its last one, drop it from the user's index and set the user's last-seen. Nothing
-- when the connection is another node's (resumed there).
-- KEYS[1] presence:user:{u}:index         hash conn -> msgpack meta
-- KEYS[2] presence:user:{u}:seen          last-seen ms
-- KEYS[3] presence:user:{u}:conns         hash conn -> node
-- KEYS[4] presence:user:{u}:chans:<conn>  set of channels
-- ARGV[1] conn
-- ARGV[2] now (ms)
-- ARGV[3] last-seen lifetime (ms)
-- ARGV[4] node
-- ARGV[5] 1 when the connection left its last presence channel, else 0
-- ARGV[6..] channels left
local owner = redis.call('HGET', KEYS[3], ARGV[1])
if owner and owner ~= ARGV[4] then
    return 0
end
if #ARGV >= 6 then
    redis.call('SREM', KEYS[4], unpack(ARGV, 6))
end
if ARGV[5] == '1' then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
return 1
