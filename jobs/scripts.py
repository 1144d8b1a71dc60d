"""The Lua scripts: every state change that must happen once, or for many items in one round trip.

Each script names its keys at its top (``local meta, req = KEYS[1], KEYS[2]``); the keys a
batch is made of come first, in the order of :data:`jobs.keys.BATCH_PARTS`, through the
generated prelude :data:`BATCH`. Item-sized arguments (claims, results) follow them, so
one call serves a whole chunk of items.
"""

from __future__ import annotations

from . import keys

# Redis's clock in milliseconds (every worker agrees on it, whatever their own clocks say).
NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# The batch's keys by name, and the index of the first key after them.
BATCH = (
    f"local {', '.join(keys.BATCH_PARTS)} = "
    + ", ".join(f"KEYS[{i}]" for i in range(1, len(keys.BATCH_PARTS) + 1))
    + f"\nlocal batch_keys = {{{', '.join(keys.BATCH_PARTS)}}}\n"
    + f"local first_item_key = {len(keys.BATCH_PARTS) + 1}\n"
)

# The batch finishes when its counts reach its total: it is stamped, and its keys expire together.
MAYBE_FINISH = """
local function maybe_finish(ttl)
  local total = redis.call('HGET', meta, 'total')
  if not total or redis.call('HEXISTS', meta, 'finished_at') == 1 then return end
  local done = 0
  for _, v in ipairs(redis.call('HVALS', counts)) do done = done + tonumber(v) end
  if done >= tonumber(total) then
    local t = redis.call('TIME')
    redis.call('HSET', meta, 'finished_at', t[1] .. '.' .. string.format('%06d', t[2]))
    for _, key in ipairs(batch_keys) do redis.call('EXPIRE', key, ttl) end
  end
end
"""

# KEYS: batch..., claim_1..claim_n
# ARGV: ttl, then per item its head and its result; a head is
# "seq status prompt_tokens completion_tokens estimated(0|1) calls token" (the token may be empty):
# one argument for the six (redis-py packs each argument in Python, a fifth of a worker's
# recording at eight arguments an item)
# -> per item 1 if recorded; 0 if the batch is gone, or the item has a result already (first wins)
# and no token was given, or that result is this very one (a record sent again); 2 if it was paid
# but is not the final result: the item has another result, or its claim is another token's (a
# worker whose claim lapsed and passed on). Then its tokens and its calls (the result's attempts)
# are counted as late, once per token (the item's ``late`` entry, and the batch's usage): what the
# user paid, all of it, is counted.
# A batch's usage, and the calls paid for an item beyond its recorded result (its ``late`` entry).
USAGE_FUNCTIONS = """
local function count_usage(prompt_tokens, completion_tokens, estimated)
  if prompt_tokens + completion_tokens > 0 then
    redis.call('HINCRBY', usage, 'prompt_tokens', prompt_tokens)
    redis.call('HINCRBY', usage, 'completion_tokens', completion_tokens)
    redis.call('HINCRBY', usage, 'estimated', estimated)
  end
end
-- counted once per claim token (a marker "<seq>@<token>"): a write sent again after its reply was
-- lost counts nothing more. A batch that finished keeps its TTL: what is counted late expires with it.
local function count_late(seq, prompt_tokens, completion_tokens, estimated, calls, token)
  if redis.call('HSETNX', late, seq .. '@' .. token, '1') == 0 then return end
  local p, c, n, e = 0, 0, 0, 0
  local old = redis.call('HGET', late, seq)
  if old then p, c, n, e = string.match(old, '(%d+) (%d+) (%d+) (%d+)') end
  redis.call('HSET', late, seq, string.format('%d %d %d %d', p + prompt_tokens, c + completion_tokens,
                                              n + calls, math.max(tonumber(e), estimated)))
  redis.call('HINCRBY', usage, 'late_calls', calls)
  count_usage(prompt_tokens, completion_tokens, 0)
  local left = redis.call('PTTL', meta)
  if left > 0 then
    redis.call('PEXPIRE', late, left)
    redis.call('PEXPIRE', usage, left)
  end
end
"""

RECORD = BATCH + MAYBE_FINISH + USAGE_FUNCTIONS + f"""
local ttl = tonumber(ARGV[1])
local recorded = {{}}
local alive = redis.call('EXISTS', meta) == 1
-- what the recorded results add to the batch's counts, log and usage: written once, after the loop
local by_status, logged, prompt_sum, completion_sum, estimated_sum = {{}}, {{}}, 0, 0, 0
for i = 1, #KEYS - first_item_key + 1 do
  local result = ARGV[2 * i + 1]
  local seq, status, prompt_tokens, completion_tokens, estimated, calls, token =
    string.match(ARGV[2 * i], '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S*)$')
  prompt_tokens, completion_tokens = tonumber(prompt_tokens), tonumber(completion_tokens)
  estimated, calls = tonumber(estimated), tonumber(calls)
  local claim = KEYS[first_item_key + i - 1]
  recorded[i] = 0
  if alive then
    local holder = redis.call('GET', claim)
    local existing = redis.call('HGET', res, seq)
    if existing then
      if token ~= '' and existing ~= result then
        count_late(seq, prompt_tokens, completion_tokens, estimated, calls, token)
        recorded[i] = 2
      end
    elseif token ~= '' and holder and holder ~= token then
      count_late(seq, prompt_tokens, completion_tokens, estimated, calls, token)
      recorded[i] = 2
    else
      redis.call('HSET', res, seq, result)
      by_status[status] = (by_status[status] or 0) + 1
      logged[#logged + 1] = seq
      if prompt_tokens + completion_tokens > 0 then
        prompt_sum, completion_sum = prompt_sum + prompt_tokens, completion_sum + completion_tokens
        estimated_sum = estimated_sum + estimated
      end
      recorded[i] = 1
    end
    if not holder or holder == token or token == '' then redis.call('DEL', claim) end
  end
end
if alive then
  for status, n in pairs(by_status) do redis.call('HINCRBY', counts, status, n) end
  for j = 1, #logged, 1000 do redis.call('RPUSH', log, unpack(logged, j, math.min(j + 999, #logged))) end
  count_usage(prompt_sum, completion_sum, estimated_sum)
  maybe_finish(ttl)
end
return recorded
"""

LATE_FIELDS = 6

# KEYS: batch... ; ARGV per item: seq prompt_tokens completion_tokens estimated(0|1) calls token
# -> how many entries were counted: calls paid for items whose result is another's (a stream
# abandoned, or earlier attempts of a run whose item another worker recorded meanwhile)
COUNT_LATE = BATCH + USAGE_FUNCTIONS + f"""
if redis.call('EXISTS', meta) == 0 then return 0 end
local counted = 0
for a = 1, #ARGV, {LATE_FIELDS} do
  count_late(ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
             ARGV[a + 5])
  counted = counted + 1
end
return counted
"""

# KEYS: meta req res claim_1..claim_n ; ARGV: ttl_ms seq_1 token_1 ... seq_n token_n
# -> {'gone'} or {'batch', options, paused_ms, outcome_1, request_1, ..., outcome_n, request_n}
# An item is claimed for its token unless it is done, cancelled, paused or held by another token.
CLAIM = NOW_MS + """
local meta, req, res, usage = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local first_claim = 5
local ttl_ms = ARGV[1]
if redis.call('EXISTS', meta) == 0 then return {'gone'} end
local m = redis.call('HMGET', meta, 'state', 'options', 'paused_until', 'budget_tokens', 'budget_requests')
local paused = 0
if m[3] then paused = math.max(0, tonumber(m[3]) - now_ms()) end
local spent = false
if m[4] or m[5] then
  local u = redis.call('HMGET', usage, 'prompt_tokens', 'completion_tokens', 'started')
  local tokens = tonumber(u[1] or '0') + tonumber(u[2] or '0')
  spent = (m[4] and tokens >= tonumber(m[4])) or (m[5] and tonumber(u[3] or '0') >= tonumber(m[5])) or false
end
local reply = {'batch', m[2] or false, paused}
for i = 1, #KEYS - first_claim + 1 do
  local claim, seq, token = KEYS[first_claim + i - 1], ARGV[2 * i], ARGV[2 * i + 1]
  local outcome, request = 'busy', false
  if redis.call('HEXISTS', res, seq) == 1 then
    outcome = 'done'
  elseif m[1] == 'cancelled' then
    -- an execution still holding the item will record its own result: a duplicate must not cancel it
    local holder = redis.call('GET', claim)
    if not holder or holder == token then outcome, request = 'cancelled', redis.call('HGET', req, seq) end
  elseif spent then
    local holder = redis.call('GET', claim)
    if not holder or holder == token then outcome, request = 'budget', redis.call('HGET', req, seq) end
  elseif paused > 0 then
    outcome = 'paused'
  elseif redis.call('SET', claim, token, 'NX', 'PX', ttl_ms) then
    outcome, request = 'claimed', redis.call('HGET', req, seq)
  elseif redis.call('GET', claim) == token then
    redis.call('PEXPIRE', claim, ttl_ms)
    outcome, request = 'claimed', redis.call('HGET', req, seq)
  end
  reply[#reply + 1] = outcome
  reply[#reply + 1] = request
end
return reply
"""

# KEYS: meta usage (of a batch with a budget) -> 1 if a provider call may start (counted in the
# usage's 'started' against budget_requests), 0 if what the batch paid reached its budget
SPEND = """
local b = redis.call('HMGET', KEYS[1], 'budget_tokens', 'budget_requests')
if b[1] then
  local u = redis.call('HMGET', KEYS[2], 'prompt_tokens', 'completion_tokens')
  if tonumber(u[1] or '0') + tonumber(u[2] or '0') >= tonumber(b[1]) then return 0 end
end
if b[2] then
  if redis.call('HINCRBY', KEYS[2], 'started', 1) > tonumber(b[2]) then
    redis.call('HINCRBY', KEYS[2], 'started', -1)
    return 0
  end
end
return 1
"""

# KEYS: claim_1..claim_n ; ARGV: ttl_ms token_1..token_n
# -> per claim 1 if it is still that token's and was extended (PEXPIRE works in a full Redis);
# also renews serve's one-key lease of a batch (aivvm_batch/serve/lease.py)
TOUCH = """
local ttl_ms = ARGV[1]
local kept = {}
for i, claim in ipairs(KEYS) do
  kept[i] = 0
  if redis.call('GET', claim) == ARGV[1 + i] then kept[i] = redis.call('PEXPIRE', claim, ttl_ms) end
end
return kept
"""

# KEYS: claim_1..claim_n ; ARGV: token_1..token_n -> how many were released (only a holder's own);
# also releases serve's one-key lease of a batch (aivvm_batch/serve/lease.py)
RELEASE = """
local released = 0
for i, claim in ipairs(KEYS) do
  if redis.call('GET', claim) == ARGV[i] then released = released + redis.call('DEL', claim) end
end
return released
"""

# KEYS: meta ; ARGV: pause_ms -> the epoch ms the batch is paused until (0: the batch is gone)
PAUSE = NOW_MS + """
local meta = KEYS[1]
if redis.call('EXISTS', meta) == 0 then return 0 end
local until_ms = now_ms() + tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', meta, 'paused_until') or '0')
if until_ms > current then redis.call('HSET', meta, 'paused_until', until_ms) end
return until_ms
"""

# KEYS: batch..., claim_1..claim_n ; ARGV: ttl seq_1 result_1 ... seq_n result_n -> how many cancelled
CANCEL = BATCH + MAYBE_FINISH + """
local n = 0
for i = first_item_key, #KEYS do
  local a = 2 * (i - first_item_key + 1)
  local seq, result = ARGV[a], ARGV[a + 1]
  if redis.call('EXISTS', KEYS[i]) == 0 and redis.call('HSETNX', res, seq, result) == 1 then
    redis.call('HINCRBY', counts, 'cancelled', 1)
    redis.call('RPUSH', log, seq)
    n = n + 1
  end
end
maybe_finish(tonumber(ARGV[1]))
return n
"""

# KEYS: batch... ; ARGV: status seq_1 ... seq_n -> the seqs whose result had that status (now forgotten)
RESET = BATCH + """
local status = ARGV[1]
local reset = {}
for i = 2, #ARGV do
  local raw = redis.call('HGET', res, ARGV[i])
  if raw and cjson.decode(raw)['status'] == status then
    redis.call('HDEL', res, ARGV[i])
    redis.call('HDEL', late, ARGV[i])
    redis.call('HINCRBY', counts, status, -1)
    table.insert(reset, ARGV[i])
  end
end
if #reset > 0 then
  redis.call('HDEL', meta, 'finished_at')
  redis.call('HSET', meta, 'state', 'running')
  for _, key in ipairs(batch_keys) do redis.call('PERSIST', key) end
end
return reset
"""

# A chunk's items travel in a few long arguments, not two per item (packing thousands of
# arguments costs the client more than the rest of a submit): ids or requests one after the
# other, each ended by ``SEP`` (a byte that never occurs in UTF-8), and their seqs as one
# string of decimals, read back by ``SPLIT``.
SEP = b"\xff"
SPLIT = """
local function split(data)
  local parts, start = {}, 1
  while start <= #data do
    local stop = string.find(data, '\\255', start, true)
    parts[#parts + 1] = string.sub(data, start, stop - 1)
    start = stop + 1
  end
  return parts
end
local function decimals(text)
  local numbers = {}
  for number in string.gmatch(text, '%d+') do numbers[#numbers + 1] = number end
  return numbers
end
"""

# KEYS: ids ; ARGV: ids (each ended by SEP) seqs (space-separated)
# -> i_1 owner_1 ... for each id (the i-th, from 1) that another seq owns; nothing for the others.
# As HSETNX ids id seq for each in turn (an id given twice is owned by its first seq), in one
# HMGET and one HSET per thousand ids rather than two calls an id.
OWN_IDS = SPLIT + """
local ids = KEYS[1]
local given, seqs = split(ARGV[1]), decimals(ARGV[2])
local taken, new, fields = {}, {}, {}
for first = 1, #given, 1000 do
  local last = math.min(first + 999, #given)
  local owners = redis.call('HMGET', ids, unpack(given, first, last))
  for i = first, last do
    local owner = owners[i - first + 1] or new[given[i]]
    if not owner then
      new[given[i]] = seqs[i]
      fields[#fields + 1] = given[i]
      fields[#fields + 1] = seqs[i]
    elseif owner ~= seqs[i] then
      taken[#taken + 1] = i
      taken[#taken + 1] = owner
    end
  end
  if #fields > 0 then
    redis.call('HSET', ids, unpack(fields))
    fields = {}
  end
end
return taken
"""

# KEYS: requests ; ARGV: requests (each ended by SEP) seqs (space-separated) -> how many were set
# (HSET requests seq_1 request_1 ..., a thousand arguments a call)
STORE_REQUESTS = SPLIT + """
local requests = KEYS[1]
local given, seqs = split(ARGV[1]), decimals(ARGV[2])
local fields, n = {}, 0
for i = 1, #given do
  fields[n + 1], fields[n + 2] = seqs[i], given[i]
  n = n + 2
  if n >= 1000 or i == #given then
    redis.call('HSET', requests, unpack(fields, 1, n))
    n = 0
  end
end
return #given
"""

# KEYS: batch... ; ARGV: total ttl
FINALIZE = BATCH + MAYBE_FINISH + """
redis.call('HSET', meta, 'total', ARGV[1])
if redis.call('HGET', meta, 'state') == 'submitting' then
  redis.call('HSET', meta, 'state', 'running')
end
maybe_finish(tonumber(ARGV[2]))
return 1
"""

# KEYS: request_slot token_slot pause (keys.rate_keys) ; ARGV: ms_per_request ms_per_token tokens
# max_wait_ms [burst_ms] -> ms to wait for the reserved slot, or minus the wait when it is too far
# to reserve (generic cell rate algorithm: each slot key holds the theoretical arrival time of the
# next call; a request may go burst_ms ahead of it)
RATE_ACQUIRE = NOW_MS + """
local request_slot, token_slot, pause = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms()
local start = now
local ahead = {[request_slot] = tonumber(ARGV[5] or '0')}
for _, key in ipairs({request_slot, token_slot, pause}) do
  local tat = tonumber(redis.call('GET', key) or '0') - (ahead[key] or 0)
  if tat > start then start = tat end
end
local wait = start - now
if wait > tonumber(ARGV[4]) then return -wait end
local costs = {{request_slot, tonumber(ARGV[1])}, {token_slot, tonumber(ARGV[2]) * tonumber(ARGV[3])}}
for _, slot in ipairs(costs) do
  local key, cost = slot[1], slot[2]
  if cost > 0 then
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < start then tat = start end
    tat = tat + cost
    redis.call('SET', key, tat, 'PX', math.max(1000, math.ceil(tat - now + 60000)))
  end
end
return wait
"""

# KEYS: pause (the third of keys.rate_keys) ; ARGV: pause_ms (0: only read) -> ms the pause still holds
RATE_PAUSE = NOW_MS + """
local pause = KEYS[1]
local now = now_ms()
local until_ms = tonumber(redis.call('GET', pause) or '0')
local wanted = now + tonumber(ARGV[1])
if tonumber(ARGV[1]) > 0 and wanted > until_ms then
  until_ms = wanted
  redis.call('SET', pause, until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return math.max(0, until_ms - now)
"""

# KEYS: workers ; ARGV: name, then "<claims held> <note>" -> nothing. Seen at Redis's time.
WORKER_BEAT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], t[1] .. '.' .. string.format('%06d', t[2]) .. ' ' .. ARGV[2])
"""

# KEYS: unacked unacked_index queue ; ARGV: delivery_tag message
# -> 1 if the unacknowledged message was put back on the queue (it is consumed next), 0 if it was
# acknowledged meanwhile. The push comes first: a full Redis refuses it and nothing is lost.
RESTORE_MESSAGE = """
local unacked, unacked_index, queue = KEYS[1], KEYS[2], KEYS[3]
local tag, message = ARGV[1], ARGV[2]
if redis.call('HEXISTS', unacked, tag) == 0 then
  redis.call('ZREM', unacked_index, tag)
  return 0
end
redis.call('RPUSH', queue, message)
redis.call('HDEL', unacked, tag)
redis.call('ZREM', unacked_index, tag)
return 1
"""

# KEYS: unacked unacked_index, then the queue's lists (highest priority first) ; ARGV: count
# -> up to count messages, each as its list's number (1: the first list) and the message, taken
# from the end of its list (as BRPOP takes them) and recorded
# as unacknowledged in the same step, as kombu records a message it delivered: the delivery tag
# scored with Redis's time, and [message, exchange, routing key] under the tag.
TAKE_MESSAGES = """
local unacked, unacked_index = KEYS[1], KEYS[2]
local wanted = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local taken = {}
for i = 3, #KEYS do
  while #taken < 2 * wanted do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local properties = cjson.decode(raw)['properties']
    local tag, info = properties['delivery_tag'], properties['delivery_info']
    redis.call('ZADD', unacked_index, now, tag)
    redis.call('HSET', unacked, tag, '[' .. raw .. ',' .. cjson.encode(info['exchange']) .. ','
                                     .. cjson.encode(info['routing_key']) .. ']')
    taken[#taken + 1] = i - 2
    taken[#taken + 1] = raw
  end
end
return taken
"""

# KEYS: held out meta slots queue ; ARGV: ended, chunk, reset, ttl, publishing -> messages moved to
# the queue. ``ended`` of the batch's messages have ended (0 when publishing); the batch may have a
# window of messages out: WINDOW_SLOT_TIMES the workers' slots (at least WINDOW_MIN_ITEMS items),
# times its priority: twice the slots keeps them busy, and a message stays out until its last item
# ends while a worker takes its next once one item can start (worker/credit.py), so each worker also
# holds up to a message beyond its slots. ``chunk``: its messages' items, as the publisher cut them
# (kept in its meta when ``publishing``); the others (a message's end, the sweep) count in what the
# meta keeps.
# ``reset``: the sweep found the batch stalled with nothing out (a message was lost).
# A batch that is gone (deleted) or finished keeps nothing held and counts nothing out.
# (no worker seen for three sweeps: slots unknown, a window as for 64 slots; a worker says its own
# at its start)
WINDOW_MIN_ITEMS, WINDOW_UNKNOWN_SLOTS, WINDOW_SLOT_TIMES = 64, 64, 3
RELEASE_WINDOW = """
local held, out, meta, slots, queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', meta) == 0 or redis.call('HEXISTS', meta, 'finished_at') == 1 then
  redis.call('DEL', held, out)  -- deleted, or finished: nothing of it waits (a retry starts afresh)
  return 0
end
local ended, chunk, reset, ttl = tonumber(ARGV[1]), math.max(1, tonumber(ARGV[2])), ARGV[3] == '1', tonumber(ARGV[4])
if ARGV[5] == '1' then
  redis.call('HSET', meta, 'chunk', chunk)
else
  chunk = math.max(1, tonumber(redis.call('HGET', meta, 'chunk') or chunk) or chunk)
end
local n = 0
if not reset then n = math.max(0, tonumber(redis.call('GET', out) or '0') - ended) end
local workers = tonumber(redis.call('GET', slots) or '""" + str(WINDOW_UNKNOWN_SLOTS) + """')
local priority = math.max(1, tonumber(redis.call('HGET', meta, 'priority') or '1') or 1)
local items = math.max(""" + str(WINDOW_MIN_ITEMS) + """, """ + str(WINDOW_SLOT_TIMES) + """ * workers) * priority
local window = math.max(2, math.ceil(items / chunk))
local moved = 0
while n < window do
  local message = redis.call('LPOP', held)
  if not message then break end
  redis.call('LPUSH', queue, message)
  n = n + 1
  moved = moved + 1
end
redis.call('SET', out, n, 'EX', ttl)
return moved
"""
