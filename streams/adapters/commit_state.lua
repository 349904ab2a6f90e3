-- Write one micro-batch's feature records and partition watermarks, if this writer still
-- owns every partition of the batch and nobody rewrote feature state behind its back.
-- Generic: no feature logic here (that runs in Python, engine/features/store.py).
--
-- KEYS[1]   hash of partition owners: field "<source>:<partition>" -> owner token
-- KEYS[2]   hash of partition watermarks: field "<source>:<partition>" -> offset
-- KEYS[3]   the state epoch (a counter `dealstream forget` increments)
-- KEYS[4..] the users' record keys
-- ARGV: token, epoch, ttl_ms, n_partitions, n_partitions x (field, offset),
--       then one record per user key (same order as KEYS[4..])
-- Returns {'ok'}, {'stale', epoch} (the epoch moved: drop every cached record and retry),
-- or {'fenced', field, owner} (another writer claimed the partition: stop writing). Nothing
-- is written unless every check passes.

local token, epoch, ttl = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('GET', KEYS[3]) or '0'
if current ~= epoch then
  return {'stale', current}
end
local n = tonumber(ARGV[4])
for i = 1, n do
  local field = ARGV[3 + 2 * i]
  local owner = redis.call('HGET', KEYS[1], field)
  if owner ~= token then
    return {'fenced', field, owner or ''}
  end
end
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[3 + 2 * i], ARGV[4 + 2 * i])
end
local base = 4 + 2 * n - 3
for k = 4, #KEYS do
  redis.call('SET', KEYS[k], ARGV[base + k], 'PX', ttl)
end
return {'ok'}
