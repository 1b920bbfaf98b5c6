-- Record a live connection of a user and return the user's connection count.
-- KEYS[1] presence:user:{u}:conns   hash conn -> node
-- ARGV[1] conn
-- ARGV[2] node
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HLEN', KEYS[1])
