-- A resume: the entry of one connection in one channel passes to another node as it is.
-- Returns the meta (msgpack), or nil when the entry is gone (swept or removed).
-- KEYS[1] presence:ch:{ch}:metas   hash user\0conn -> msgpack [user, node, meta]
-- ARGV[1] field (user\0conn)
-- ARGV[2] the adopting node
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then
    return false
end
local entry = cmsgpack.unpack(old)
entry[2] = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack(entry))
return cmsgpack.pack(entry[3])
