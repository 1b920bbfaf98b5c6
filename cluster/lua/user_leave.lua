-- A connection left its last presence channel: drop it from the user's index and set
-- the user's last-seen.
-- KEYS[1] presence:user:{u}:index   hash conn -> msgpack meta
-- KEYS[2] presence:user:{u}:seen    last-seen ms
-- ARGV[1] conn
-- ARGV[2] now (ms)
-- ARGV[3] last-seen lifetime (ms)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
