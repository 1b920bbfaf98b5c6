-- Remove a node from the registry unless it was refreshed since it was read.
-- KEYS[1] presence:nodes   zset node -> lease expiry ms
-- ARGV[1] node
-- ARGV[2] the score read before deciding to prune
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
    return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
