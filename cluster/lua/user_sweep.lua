-- Forget connections of a user that lived on a swept (dead) node, and set last-seen.
-- KEYS[1] presence:user:{u}:conns   hash conn -> node
-- KEYS[2] presence:user:{u}:index   hash conn -> msgpack meta
-- KEYS[3] presence:user:{u}:seen    last-seen ms
-- ARGV[1] now (ms)
-- ARGV[2] last-seen lifetime (ms)
-- ARGV[3..] conns to forget
for i = 3, #ARGV do
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return 1
