-- Refresh a node's lease and return the expiry it replaced (nil when there was none:
-- never set, expired by its PX, dropped, or removed by a sweeper's claim).
-- KEYS[1] presence:node:{n}:lease   lease expiry ms
-- ARGV[1] new expiry (ms)
-- ARGV[2] ttl (ms)
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return previous
