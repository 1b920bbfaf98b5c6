-- Claim a connection for a resume (single use): the resume hash must match; it is
-- replaced by the new one and the connection record passes to the adopting node.
-- Returns {old node, channel...} or nil when the hash does not match or the
-- connection is gone (its node was swept, or it ended).
-- KEYS[1] presence:user:{u}:conns         hash conn -> node
-- KEYS[2] presence:user:{u}:resume        hash conn -> resume hash
-- KEYS[3] presence:user:{u}:chans:<conn>  set of channels
-- ARGV[1] conn
-- ARGV[2] resume hash presented
-- ARGV[3] new resume hash
-- ARGV[4] adopting node
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
    return false
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then
    return false
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
local out = {old}
for _, ch in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    out[#out + 1] = ch
end
return out
