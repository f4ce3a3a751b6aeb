"""The official openai SDK as a client of the dispatcher's OpenAI front door
(`[openai] listen`), in front of real region-sim processes. Run by
tests/openai_door.rs:

    python3 against_door.py BASE_URL

Prints one line per check; exits non-zero on the first that fails."""

import sys

import openai

base = sys.argv[1] + "/v1"
MESSAGES = [{"role": "user", "content": "Say hello to the dispatcher."}]

client = openai.OpenAI(base_url=base, api_key="k-alpha", max_retries=2)

models = sorted(m.id for m in client.models.list())
assert models == ["chat", "gpt-4o"], models
print("models ok", models)

raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
done = raw.parse()
# The prompt as estimated from the messages: 3 + 4 + ceil((4 + 28) / 4).
assert done.usage.prompt_tokens == 15, done.usage
assert 1 <= done.usage.completion_tokens <= 50, done.usage
assert done.object == "chat.completion" and done.model == "gpt-4o", done
assert done.choices[0].message.role == "assistant", done
assert "tokens" in done.choices[0].message.content, done
assert raw.headers["x-dispatcher-region"] == "east", raw.headers
assert raw.headers["x-dispatcher-attempts"] == "1", raw.headers
assert raw.headers["x-request-id"] and done.id == "chatcmpl-" + raw.headers["x-request-id"], raw.headers
print("completion ok", done.usage.completion_tokens)

aliased = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=5)
assert aliased.headers["x-dispatcher-alias"] == "chat", aliased.headers
assert aliased.parse().model == "gpt-4o"
print("alias ok")

chunks = list(
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=100, stream=True, stream_options={"include_usage": True}
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
usage = chunks[-1].usage
assert usage is not None and usage.completion_tokens >= 1 and not chunks[-1].choices, chunks[-1]
assert usage.prompt_tokens == 15, usage
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
assert any(c.choices and c.choices[0].finish_reason for c in chunks), chunks
assert text.endswith("..%d\n" % usage.completion_tokens), text
print("stream ok", len(chunks), "chunks")

# `slow` may send one request a second: the second at once is refused
# (429 with retry-after-ms), which the SDK waits out by itself.
slow = openai.OpenAI(base_url=base, api_key="k-slow", max_retries=2)
slow.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
raw = slow.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
assert raw.retries_taken >= 1, raw.retries_taken
assert raw.parse().usage.completion_tokens >= 1
print("retried ok", raw.retries_taken)

impatient = openai.OpenAI(base_url=base, api_key="k-slow", max_retries=0)
try:
    for _ in range(2):
        impatient.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    raise SystemExit("a tenant over its limit was served")
except openai.RateLimitError as e:
    ms = float(e.response.headers["retry-after-ms"])
    assert 0 < ms <= 1000, ms
    assert int(e.response.headers["retry-after"]) >= 1, e.response.headers
    assert e.code == "rate_limit_exceeded", e.body
    assert "requests_per_second" in e.message, e.message
    print("rate limited ok", ms)

try:
    client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=5)
    raise SystemExit("an unknown model was served")
except openai.NotFoundError as e:
    assert e.code == "model_not_found" and e.param == "model", e.body
    print("not found ok", e.status_code)

bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
try:
    bad.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    raise SystemExit("a wrong key was served")
except openai.AuthenticationError as e:
    assert "wrong" not in str(e)
    print("authentication ok", e.status_code)

try:
    client.chat.completions.create(model="gpt-4o", messages=[{"content": "no role"}], max_tokens=5)
    raise SystemExit("a bad body was served")
except openai.BadRequestError as e:
    assert e.param == "messages[0].role", e.body
    print("bad request ok", e.status_code)

print("all ok")
