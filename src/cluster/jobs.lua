-- Jobs in Redis (src/cluster/jobs.rs): each call is one atomic step on the
-- job keys, which all share one hash tag (one Redis Cluster slot). The
-- lease rules are core::job::JobLease's, step for step
-- (tests/jobs_replicas.rs checks the two agree):
--   claim: only once the lease lapsed (now >= exp) or by its own owner;
--          the fence goes up by one, the lease runs from now;
--   renew: only with the current fence;
--   admit (a write): only with the current fence.
--
-- `claim` looks only at lapsed leases, so a replica never claims a job it
-- runs; JobLease::claim also lets an owner claim its own job early, which
-- Redis never asks for.
--
-- Keys (P = ARGV[1], e.g. "dispatcher:{jobs}:"):
--   P.."job:"..id     hash: rec (StoredJob bytes), owner, fence, exp (lease
--                     expiry ms), cancel (0/1), tenant, key, size (bytes of
--                     rec + events), expires (set once finished)
--   P.."events:"..id  list of JobEvent bytes; seq = index + 1
--   P.."leases"       zset id -> lease expiry, unfinished jobs only
--   P.."finished"     zset id -> expires_unix_ms, finished jobs only
--   P.."tenant:"..t   zset id -> created ms (ListJobs, newest first)
--   P.."key:"..len(t)..":"..t..":"..k  string -> id (idempotency key)
--   KEYS[1]           hash: jobs, bytes (the size bound)
--
-- ARGV: prefix, op, now ms ("" = Redis TIME), then the op's own.

local P, op = ARGV[1], ARGV[2]
local now = tonumber(ARGV[3])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local USAGE = KEYS[1]
local LEASES = P .. 'leases'
local FINISHED = P .. 'finished'
local function job_key(id) return P .. 'job:' .. id end
local function events_key(id) return P .. 'events:' .. id end
local function tenant_key(t) return P .. 'tenant:' .. t end
local function idem_key(t, k) return P .. 'key:' .. string.len(t) .. ':' .. t .. ':' .. k end
local function int(n) return string.format('%d', n) end

-- The job a tenant's key names: the one stored with it or, when none was
-- and the key is the id of the tenant's job stored without a key, that job
-- (a submission whose answer was lost is resubmitted with its id as the key).
-- -> {"existing", rec, owner, fence, cancel} | nil
local function named(tenant, key, by_id)
  local id = redis.call('GET', idem_key(tenant, key))
  if not id and by_id then
    local h = redis.call('HMGET', job_key(key), 'tenant', 'key')
    if h[1] == tenant and (h[2] or '') == '' then id = key end
  end
  if not id then return nil end
  local h = redis.call('HMGET', job_key(id), 'rec', 'owner', 'fence', 'cancel')
  if not h[1] then return nil end
  return {'existing', h[1], h[2] or '', h[3] or '0', h[4] or '0'}
end

-- by_key: tenant, key -> {"existing", ...} | {"none"}
if op == 'by_key' then
  return named(ARGV[4], ARGV[5], true) or {'none'}
end

-- create: id, tenant, idempotency key, created ms, owner, lease ms, record,
-- first event, max jobs, max bytes.
-- -> {"stored"} | {"existing", rec, owner, fence, cancel} | {"full_jobs"|"full_bytes", n}
if op == 'create' then
  local id, tenant, key = ARGV[4], ARGV[5], ARGV[6]
  local created, owner, lease = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
  local rec, first = ARGV[10], ARGV[11]
  local max_jobs, max_bytes = tonumber(ARGV[12]), tonumber(ARGV[13])
  -- Without a key: stored already under this job's id as a key (this
  -- create arrives after its resubmission), nothing stored.
  local existing
  if key ~= '' then existing = named(tenant, key, true) else existing = named(tenant, id, false) end
  if existing then return existing end
  local u = redis.call('HMGET', USAGE, 'jobs', 'bytes')
  local jobs, bytes = tonumber(u[1]) or 0, tonumber(u[2]) or 0
  local size = string.len(rec) + string.len(first)
  if jobs >= max_jobs then return {'full_jobs', int(jobs)} end
  if bytes + size > max_bytes then return {'full_bytes', int(bytes)} end
  local exp = now + lease
  redis.call('HSET', job_key(id), 'rec', rec, 'owner', owner, 'fence', 1, 'exp', int(exp),
    'cancel', 0, 'tenant', tenant, 'key', key, 'size', size)
  redis.call('RPUSH', events_key(id), first)
  redis.call('ZADD', LEASES, exp, id)
  redis.call('ZADD', tenant_key(tenant), created, id)
  if key ~= '' then redis.call('SET', idem_key(tenant, key), id) end
  redis.call('HINCRBY', USAGE, 'jobs', 1)
  redis.call('HINCRBY', USAGE, 'bytes', size)
  return {'stored'}
end

-- write: id, fence, record, expires ms (0: unfinished), first event's seq,
-- events... -> {"ok"} | {"fenced", owner, fence} | {"gone"} | {"gap", last seq}
if op == 'write' then
  local id, fence, rec = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local expires, first = tonumber(ARGV[7]), tonumber(ARGV[8])
  local k, ek = job_key(id), events_key(id)
  local h = redis.call('HMGET', k, 'fence', 'owner', 'size')
  if not h[1] then return {'gone'} end
  if tonumber(h[1]) ~= fence then return {'fenced', h[2] or '', h[1]} end
  -- Appended only in order, after the last: a second guard behind the fence.
  local len = redis.call('LLEN', ek)
  if #ARGV >= 9 and first ~= len + 1 then return {'gap', int(len)} end
  local size = tonumber(h[3]) - redis.call('HSTRLEN', k, 'rec') + string.len(rec)
  for i = 9, #ARGV do
    redis.call('RPUSH', ek, ARGV[i])
    size = size + string.len(ARGV[i])
  end
  redis.call('HINCRBY', USAGE, 'bytes', int(size - tonumber(h[3])))
  redis.call('HSET', k, 'rec', rec, 'size', int(size))
  if expires > 0 then
    redis.call('HSET', k, 'expires', int(expires))
    redis.call('ZREM', LEASES, id)
    redis.call('ZADD', FINISHED, expires, id)
  end
  return {'ok'}
end

-- claim: owner, lease ms, max. The unfinished jobs whose lease lapsed, taken
-- with the fence raised -> {id, fence, cancel, rec, previous owner, ...}
if op == 'claim' then
  local owner, lease, max = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local ids = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, max)
  local out = {}
  for _, id in ipairs(ids) do
    local k = job_key(id)
    local h = redis.call('HMGET', k, 'owner', 'fence', 'exp', 'rec', 'cancel', 'expires')
    if not h[4] or h[6] then
      redis.call('ZREM', LEASES, id)
    elseif now < tonumber(h[3]) and h[1] ~= owner then
      -- Renewed since the index said otherwise: held.
      redis.call('ZADD', LEASES, h[3], id)
    else
      local fence = tonumber(h[2]) + 1
      local exp = now + lease
      redis.call('HSET', k, 'owner', owner, 'fence', fence, 'exp', int(exp))
      redis.call('ZADD', LEASES, exp, id)
      out[#out + 1] = id
      out[#out + 1] = int(fence)
      out[#out + 1] = h[5] or '0'
      out[#out + 1] = h[4]
      out[#out + 1] = h[1] or ''
    end
  end
  return out
end

-- heartbeat: lease ms, then id, fence pairs. Renews each held with the
-- current fence -> {{ids to cancel}, {ids lost}}
if op == 'heartbeat' then
  local lease = tonumber(ARGV[4])
  local cancel, lost = {}, {}
  for i = 5, #ARGV - 1, 2 do
    local id, fence = ARGV[i], tonumber(ARGV[i + 1])
    local k = job_key(id)
    local h = redis.call('HMGET', k, 'fence', 'cancel', 'expires')
    if not h[1] or tonumber(h[1]) ~= fence then
      lost[#lost + 1] = id
    else
      if not h[3] then
        local exp = now + lease
        redis.call('HSET', k, 'exp', int(exp))
        redis.call('ZADD', LEASES, 'XX', exp, id)
      end
      if h[2] == '1' then cancel[#cancel + 1] = id end
    end
  end
  return {cancel, lost}
end

-- release: id, fence pairs. Ends the leases the caller still holds (a
-- replica stopping hands its queued jobs over at once instead of after the
-- lease) -> n released
if op == 'release' then
  local n = 0
  for i = 4, #ARGV - 1, 2 do
    local id, fence = ARGV[i], tonumber(ARGV[i + 1])
    local k = job_key(id)
    local h = redis.call('HMGET', k, 'fence', 'expires')
    if h[1] and tonumber(h[1]) == fence and not h[2] then
      redis.call('HSET', k, 'exp', int(now))
      redis.call('ZADD', LEASES, 'XX', now, id)
      n = n + 1
    end
  end
  return n
end

-- cancel: id. Marks it for its owner (nothing when it is gone).
if op == 'cancel' then
  local k = job_key(ARGV[4])
  if redis.call('EXISTS', k) == 1 then redis.call('HSET', k, 'cancel', 1) end
  return {'ok'}
end

-- expire: max. Removes up to max finished jobs past their expiry (now is
-- the caller's wall clock: expires_unix_ms is too) -> n removed
if op == 'expire' then
  local max = tonumber(ARGV[4])
  local ids = redis.call('ZRANGEBYSCORE', FINISHED, '-inf', now, 'LIMIT', 0, max)
  for _, id in ipairs(ids) do
    local k = job_key(id)
    local h = redis.call('HMGET', k, 'tenant', 'key', 'size')
    redis.call('ZREM', FINISHED, id)
    if h[1] then
      redis.call('ZREM', tenant_key(h[1]), id)
      if h[2] and h[2] ~= '' and redis.call('GET', idem_key(h[1], h[2])) == id then
        redis.call('DEL', idem_key(h[1], h[2]))
      end
      redis.call('HINCRBY', USAGE, 'jobs', -1)
      redis.call('HINCRBY', USAGE, 'bytes', int(-(tonumber(h[3]) or 0)))
    end
    redis.call('DEL', k, events_key(id))
  end
  return #ids
end

return redis.error_reply('jobs.lua: unknown op ' .. tostring(op))
