-- Store the latest record of each supplier of an org with its score.
-- KEYS[1] presence:churn:{org}:records   hash supplier -> msgpack record
-- KEYS[2] presence:churn:{org}:scores    zset supplier -> score
-- ARGV[3i+1], ARGV[3i+2], ARGV[3i+3]  supplier, score, record (i = 0, 1, ...)
for i = 1, #ARGV, 3 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
end
return #ARGV / 3
