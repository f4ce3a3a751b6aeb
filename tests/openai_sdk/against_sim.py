"""The official openai SDK against `region-sim --openai`: it must take the
simulated provider for the real thing. Run by tests/region_sim_openai.rs:

    python3 against_sim.py BASE_URL KEY openai|azure

Prints one line per check; exits non-zero on the first that fails."""

import sys

import openai

base, key, dialect = sys.argv[1], sys.argv[2], sys.argv[3]
MESSAGES = [{"role": "user", "content": "Say hello to the simulated provider."}]

if dialect == "azure":
    client = openai.AzureOpenAI(azure_endpoint=base, api_key=key, api_version="2024-10-21", max_retries=2)
    bad = openai.AzureOpenAI(azure_endpoint=base, api_key="wrong", api_version="2024-10-21", max_retries=0)
else:
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=2)
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)

done = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
assert done.usage.prompt_tokens == 17, done.usage
assert 1 <= done.usage.completion_tokens <= 50, done.usage
assert done.choices[0].message.content, done
print("completion ok", done.usage.completion_tokens)

chunks = list(
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=100, stream=True, stream_options={"include_usage": True}
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
usage = chunks[-1].usage
assert usage is not None and usage.completion_tokens >= 1, chunks[-1]
assert text.endswith("..%d\n" % usage.completion_tokens), text
print("stream ok", len(chunks), "chunks")

# `tight` holds 6,000 tokens and refills 100 a second: the first call takes
# nearly all, the second is refused with retry-after-ms of about a second,
# which the SDK waits out by itself before it succeeds.
client.chat.completions.create(model="tight", messages=MESSAGES, max_tokens=5950)
raw = client.chat.completions.with_raw_response.create(model="tight", messages=MESSAGES, max_tokens=100)
assert raw.retries_taken >= 1, raw.retries_taken
assert raw.parse().usage.completion_tokens >= 1
print("retried ok", raw.retries_taken)

try:
    client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=5)
    raise SystemExit("an unknown model was served")
except openai.NotFoundError as e:
    print("not found ok", e.status_code)

try:
    bad.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    raise SystemExit("a wrong key was served")
except openai.AuthenticationError as e:
    assert key not in str(e)
    print("authentication ok", e.status_code)

print("all ok")
