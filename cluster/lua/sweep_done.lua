-- A sweeper finished: drop the claimed records and release its lock.
-- KEYS[1] presence:node:{n}:sweep:metas
-- KEYS[2] presence:node:{n}:sweep:conns
-- KEYS[3] presence:node:{n}:sweep:lock
-- ARGV[1] sweeper token
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
