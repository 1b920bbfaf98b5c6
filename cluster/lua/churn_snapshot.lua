-- The records of an org that can be among its ARGV[1] highest scores: every record
-- scoring at least the limit-th highest score (ties at the boundary included, so the
-- caller can order ties by supplier and cut at the limit).
-- KEYS[1] presence:churn:{org}:records   hash supplier -> msgpack record
-- KEYS[2] presence:churn:{org}:scores    zset supplier -> score
-- ARGV[1] limit (>= 1)
local limit = tonumber(ARGV[1])
local kth = redis.call('ZREVRANGE', KEYS[2], limit - 1, limit - 1, 'WITHSCORES')
local suppliers
if #kth == 0 then
    suppliers = redis.call('ZRANGE', KEYS[2], 0, -1)
else
    suppliers = redis.call('ZRANGEBYSCORE', KEYS[2], kth[2], '+inf')
end
local out = {}
-- HMGET in chunks: unpack() of thousands of values would overflow Lua's C stack.
for i = 1, #suppliers, 500 do
    local last = math.min(i + 499, #suppliers)
    local got = redis.call('HMGET', KEYS[1], unpack(suppliers, i, last))
    for j = 1, #got do
        out[#out + 1] = got[j]
    end
end
return out
