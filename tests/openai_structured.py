"""Structured outputs through the official `openai` client: every output is
checked by an independent validator (the `jsonschema` package, Python's
`re`), whole and streamed, with n = 2.

Usage: python tests/openai_structured.py http://127.0.0.1:PORT MODEL_NAME
Exits non-zero (with an assertion message) on any mismatch.
"""
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import jsonschema
import openai
from openai import OpenAI
from pydantic import BaseModel, Field

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)

S = lambda n: {"type": "string", "maxLength": n}  # noqa: E731

# (prompt, schema): varied keywords, strings bounded so a small model ends.
SCHEMAS = [
    ("A person.", {"type": "object", "properties": {"name": S(20), "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                   "required": ["name", "age"], "additionalProperties": False}),
    ("Pick a color.", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}),
    ("Some numbers.", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}),
    ("An address.", {"type": "object", "properties": {"street": S(30), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                     "required": ["street", "zip"], "additionalProperties": False}),
    ("A family.", {"$defs": {"member": {"type": "object", "properties": {"name": S(12), "age": {"type": "integer", "minimum": 0}},
                                         "required": ["name", "age"], "additionalProperties": False}},
                   "type": "object", "properties": {"parent": {"$ref": "#/$defs/member"},
                                                    "children": {"type": "array", "items": {"$ref": "#/$defs/member"}, "maxItems": 2}},
                   "required": ["parent", "children"], "additionalProperties": False}),
    ("An id.", {"type": "object", "properties": {"id": {"anyOf": [S(10), {"type": "integer"}]}}, "required": ["id"]}),
    ("A ratio.", {"type": "object", "properties": {"ratio": {"type": "number", "minimum": 1.5, "maximum": 2.5}}, "required": ["ratio"]}),
    ("Is it true?", {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
                     "additionalProperties": False}),
    ("A flight code.", {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                        "required": ["code"]}),
    ("A date.", {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
                 "required": ["date"]}),
    ("The version.", {"type": "object", "properties": {"version": {"const": "v1"}, "build": {"type": "integer"}},
                      "required": ["version", "build"]}),
    ("Optional fields.", {"type": "object", "properties": {"title": S(15), "subtitle": S(15)}, "required": ["title"],
                          "additionalProperties": False}),
    ("A range.", {"type": "object", "properties": {"low": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10},
                                                   "high": {"type": "integer", "minimum": 10, "exclusiveMaximum": 100}},
                  "required": ["low", "high"]}),
    ("A todo list.", {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}, "done": {"type": "boolean"}},
                                                 "required": ["id", "done"], "additionalProperties": False}, "maxItems": 3}),
    ("A nickname or nothing.", {"type": "object", "properties": {"nick": {"type": ["string", "null"], "maxLength": 10}},
                                "required": ["nick"]}),
    ("A matrix.", {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}),
    ("A short word.", {"type": "string", "minLength": 3, "maxLength": 5}),
    ("A temperature.", {"type": "number", "minimum": -40, "maximum": 50, "multipleOf": 0.5}),
    ("Scores.", {"type": "object", "properties": {"math": {"type": "integer"}}, "required": ["math"],
                 "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100}, "maxProperties": 3}),
    ("A status.", {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100, "maximum": 599}},
                   "required": ["status", "code"], "additionalProperties": False}),
    ("Tags.", {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "minItems": 1, "maxItems": 3}},
               "required": ["tags"], "additionalProperties": False}),
    ("A point.", {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"],
                  "additionalProperties": False}),
]
assert len(SCHEMAS) >= 20


def strict(schema):
    """OpenAI's strict mode: objects without a rule for other keys get none."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


SCHEMAS = [(p, strict(s)) for p, s in SCHEMAS]


def chat(prompt, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=300, **kw
    )


def streamed_chat(prompt, **kw):
    texts, reasons = {}, {}
    for chunk in chat(prompt, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)]


def check_schema(case):
    prompt, schema = case
    rf = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    whole = chat(prompt, response_format=rf, n=2, temperature=0.8, seed=3)
    outs = [(c.message.content, c.finish_reason) for c in whole.choices]
    texts, reasons = streamed_chat(prompt, response_format=rf, temperature=0)
    outs += list(zip(texts, reasons))
    for text, reason in outs:
        assert reason == "stop", (prompt, reason, text)
        jsonschema.validate(json.loads(text), schema)
    return len(outs)


with ThreadPoolExecutor(8) as pool:
    checked = sum(pool.map(check_schema, SCHEMAS))
print(f"{len(SCHEMAS)} schemas, {checked} outputs valid")


# parse() with pydantic models (the SDK makes a strict schema and parses back).
class Step(BaseModel):
    explanation: str = Field(max_length=40)
    output: int


class Solution(BaseModel):
    steps: list[Step] = Field(max_length=3)
    final_answer: int


class Event(BaseModel):
    name: str = Field(max_length=20)
    kind: Literal["meeting", "call"]
    room: Optional[int]


for cls, prompt in [(Solution, "Solve 8x + 7 = -23 step by step."), (Event, "A meeting in room 4.")]:
    r = client.beta.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": prompt}], response_format=cls, max_tokens=300, temperature=0
    )
    assert r.choices[0].finish_reason == "stop", r
    assert isinstance(r.choices[0].message.parsed, cls), r

# json_object: any object. Nothing bounds it, and this small model can
# repeat itself inside one until max_tokens (which output does changes with
# the last bits of the kernels' sums): an output that ends must be an
# object, one cut at the limit must have begun as one, and most must end.
whole = chat("Reply with a JSON object of two keys.", response_format={"type": "json_object"}, n=2, temperature=0.7, seed=5)
texts, reasons = streamed_chat("Reply with a JSON object of two keys.", response_format={"type": "json_object"}, temperature=0)
outputs = [(c.message.content, c.finish_reason) for c in whole.choices] + list(zip(texts, reasons))
for text, reason in outputs:
    assert reason in ("stop", "length"), (reason, text)
    if reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:
        assert text.lstrip().startswith("{"), text
assert sum(reason == "stop" for _, reason in outputs) >= 2, outputs

# regex and choice, through vLLM's fields (completions and chat).
pattern = r"\(\d{3}\) \d{3}-\d{4}"
for kw in [{"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}]:
    r = client.completions.create(model=model, prompt="Call me at", max_tokens=30, n=2, temperature=0.9, seed=1, extra_body=kw)
    for c in r.choices:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model, prompt="Call me at", max_tokens=30, stream=True, extra_body=kw) if ch.choices)
    assert re.fullmatch(pattern, text), text
choices = ["positive", "negative", "neutral"]
for kw in [{"structured_outputs": {"choice": choices}}, {"guided_choice": choices}]:
    r = chat("Classify: I love this!", n=2, temperature=1.0, seed=2, extra_body=kw)
    assert all(c.message.content in choices for c in r.choices), r
    texts, _ = streamed_chat("Classify: I love this!", extra_body=kw)
    assert texts[0] in choices, texts

# A Lark grammar.
grammar = 'start: "SELECT " col " FROM " table\ncol: "name" | "age"\ntable: /[a-z]{1,10}/'
r = client.completions.create(model=model, prompt="SQL:", max_tokens=40, extra_body={"structured_outputs": {"grammar": grammar}})
assert re.fullmatch(r"SELECT (name|age) FROM [a-z]{1,10}", r.choices[0].text), r.choices[0].text

# Tool calls through the SDK: pydantic function tools parsed back, and a
# streamed named call whose deltas assemble to the whole one.
class GetWeather(BaseModel):
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


r = client.beta.chat.completions.parse(
    model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}], max_tokens=100, temperature=0,
    tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required",
)
assert r.choices[0].finish_reason == "tool_calls", r
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather), call
tools = [openai.pydantic_function_tool(GetWeather)]
named = {"type": "function", "function": {"name": "GetWeather"}}
whole = chat("Weather in Oslo?", tools=tools, tool_choice=named, temperature=0)
args, name, reason = "", None, None
for chunk in chat("Weather in Oslo?", tools=tools, tool_choice=named, temperature=0, stream=True):
    for c in chunk.choices:
        for d in c.delta.tool_calls or []:
            name = name or d.function.name
            args += d.function.arguments or ""
        reason = c.finish_reason or reason
w = whole.choices[0].message.tool_calls[0].function
assert (name, args, reason) == (w.name, w.arguments, "tool_calls"), (name, args, reason, w)
GetWeather.model_validate_json(args)

# Bad input: a 400 naming the field.
for kw, field in [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: missing_rule"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
]:
    try:
        chat("Hi", **kw)
        raise AssertionError(f"{kw} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == field, (kw, e.body)

print("all checks passed")
