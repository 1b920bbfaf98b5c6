-- Replace churn records only if nobody wrote them since they were read (compare and set).
-- KEYS[1] presence:churn:{org}:records   hash supplier -> msgpack record
-- KEYS[2] presence:churn:{org}:scores    zset supplier -> score
-- ARGV[1] n: the number of suppliers read
-- ARGV[2i], ARGV[2i+1] (i = 1..n)  supplier, the exact bytes read ("" when it had none)
-- then ARGV[2n+2+3j], +1, +2 (j = 0, 1, ...)  supplier, score, record to store
-- Returns 1 when stored, 0 (nothing written) when a record read has changed since.
local n = tonumber(ARGV[1])
for i = 1, n do
    local current = redis.call('HGET', KEYS[1], ARGV[2 * i])
    if current == false then current = '' end
    if current ~= ARGV[2 * i + 1] then
        return 0
    end
end
for i = 2 * n + 2, #ARGV, 3 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
end
return 1
