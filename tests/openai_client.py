"""Drives a running strata server with the official `openai` Python client.

Usage: python tests/openai_client.py http://127.0.0.1:PORT MODEL_NAME
Exits non-zero (with an assertion message) on any mismatch.
"""
import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused")

assert [m.id for m in client.models.list().data] == [model]

messages = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
text = r.choices[0].message.content
assert text, r
assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
assert r.choices[0].finish_reason in ("stop", "length")

stream = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=16, stream=True,
    stream_options={"include_usage": True},
)
parts, usage, reasons = [], None, []
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            reasons.append(c.finish_reason)
assert "".join(parts) == text, ("".join(parts), text)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
assert reasons == [r.choices[0].finish_reason]

lp = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
assert c.choices[0].text and c.usage.completion_tokens == 8
streamed = "".join(
    ch.choices[0].text for ch in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    ) if ch.choices
)
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    raise AssertionError("temperature=5 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass

print("openai client: all checks passed")
