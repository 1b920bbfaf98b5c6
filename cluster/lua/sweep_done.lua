-- A sweeper published the leaves of its claim: drop the claimed records and the lock.
-- Nothing happens when the lock is no longer this sweeper's (it expired and another
-- sweeper took the claim over).
-- KEYS[1] presence:node:{n}:sweep:metas
-- KEYS[2] presence:node:{n}:sweep:conns
-- KEYS[3] presence:node:{n}:sweep:lock
-- ARGV[1] the lock's value as the claim wrote it
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
