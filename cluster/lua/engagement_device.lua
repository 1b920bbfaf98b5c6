-- Record one device use of a user and evict the least recently used beyond the bound.
-- KEYS[1]  presence:user:{u}:devices   hash device -> last used ms
-- ARGV[1]  device name    ARGV[2] now ms    ARGV[3] max devices    ARGV[4] expire at ms
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local max = tonumber(ARGV[3])
while redis.call('HLEN', KEYS[1]) > max do
  local flat = redis.call('HGETALL', KEYS[1])
  local victim, victim_ms = nil, nil
  for i = 1, #flat, 2 do
    local ms = tonumber(flat[i + 1])
    if flat[i] ~= ARGV[1] and (victim == nil or ms < victim_ms
        or (ms == victim_ms and flat[i] < victim)) then
      victim, victim_ms = flat[i], ms
    end
  end
  redis.call('HDEL', KEYS[1], victim)
end
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return 1
