-- Forget connections of a user that lived on a swept (dead) node, and set last-seen.
-- A connection recorded as another node's (resumed there) is left alone. Returns
-- {connections forgotten, the user's connections left, conn resumed elsewhere...}.
-- KEYS[1] presence:user:{u}:conns   hash conn -> node
-- KEYS[2] presence:user:{u}:index   hash conn -> msgpack meta
-- KEYS[3] presence:user:{u}:seen    last-seen ms
-- KEYS[4] presence:user:{u}:resume  hash conn -> resume hash
-- KEYS[5..] presence:user:{u}:chans:<conn>, one per conn, in the order of the conns
-- ARGV[1] last-seen (ms)
-- ARGV[2] last-seen lifetime (ms)
-- ARGV[3] the swept node
-- ARGV[4..] conns to forget
local forgot = 0
local elsewhere = {}
for i = 4, #ARGV do
    local owner = redis.call('HGET', KEYS[1], ARGV[i])
    if not owner or owner == ARGV[3] then
        redis.call('HDEL', KEYS[1], ARGV[i])
        redis.call('HDEL', KEYS[2], ARGV[i])
        redis.call('HDEL', KEYS[4], ARGV[i])
        redis.call('DEL', KEYS[i + 1])
        forgot = forgot + 1
    else
        elsewhere[#elsewhere + 1] = ARGV[i]
    end
end
if forgot > 0 then
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
end
local out = {forgot, redis.call('HLEN', KEYS[1])}
for _, conn in ipairs(elsewhere) do
    out[#out + 1] = conn
end
return out
