"""Structured output and tool calls through the official openai client against a live server: JSON that
parses and satisfies the schema, tool calls in OpenAI's shape, and a 400 for what cannot be served."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from support import REPO, SMALL, error_of

from needle.engine import SamplingParams
from needle.scheduler.sampling_params import StructuredOutputsParams
from needle.server.protocol import ChatCompletionRequest
from needle.server.tools import plan_tools

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0,
                                                                           "maximum": 120},
                   "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Rome?"}]
HERMES_TEMPLATE = REPO / "tests" / "data" / "hermes_tools.jinja"


@pytest.fixture(scope="module")
def server(serve):
    return serve(*SMALL)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_json_schema_output_satisfies_the_schema(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A person."}],
                                       response_format=fmt, temperature=0.9, seed=4, n=3, max_tokens=120)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_the_clients_parse_helper_gets_its_pydantic_model(client, model):
    class City(BaseModel):  # bounded: a 135M model left free runs strings and numbers on
        name: Annotated[str, Field(max_length=30)]
        country: Annotated[str, Field(max_length=30)]
        population: Annotated[int, Field(ge=0, le=100_000_000)]

    r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Describe Paris."}],
                                      response_format=City, temperature=0, max_tokens=80)
    assert isinstance(r.choices[0].message.parsed, City)


def test_json_object_on_both_endpoints_and_streamed(client, model):
    r = client.completions.create(model=model, prompt="A JSON object describing a cat:", max_tokens=60,
                                  temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A dog."}],
                                            response_format={"type": "json_object"}, temperature=0,
                                            max_tokens=60, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_constrained_and_plain_requests_batch_together(client, model):
    """Constrained rows are masked within the same batch as plain ones, which stay token-identical."""
    def plain():
        return client.completions.create(model=model, prompt="The three primary colours are",
                                         max_tokens=24, temperature=0).choices[0].text

    alone = plain()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with ThreadPoolExecutor(4) as pool:
        shaped = [pool.submit(client.chat.completions.create, model=model, response_format=fmt,
                              messages=[{"role": "user", "content": f"Person number {i}."}],
                              temperature=0, max_tokens=100)
                  for i in range(3)]
        mixed = pool.submit(plain)
        assert mixed.result() == alone
        for f in shaped:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), PERSON)


def test_tool_choice_required_and_named_return_openai_tool_calls(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME],
                                       tool_choice="required", parallel_tool_calls=False, temperature=0,
                                       max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       temperature=0, max_tokens=60, stream=True)
    deltas = [c.choices[0].delta for c in r if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME["function"]["parameters"])


def test_auto_tools_need_a_template_with_tool_support(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60,
                   json={"messages": ASK, "tools": [WEATHER]})
    err = error_of(r, 400)
    assert err["param"] == "tool_choice" and "chat template" in err["message"]
    assert "--chat-template" in err["message"]


def test_auto_tools_parse_hermes_tool_calls(serve):
    server = serve(*SMALL, "--chat-template", str(HERMES_TEMPLATE))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)

    def called(city: str) -> dict:
        call = {"name": "get_weather", "arguments": json.dumps({"city": city})}
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": f"call_{city}", "type": "function", "function": call}]}

    messages = [{"role": "user", "content": "Weather in Paris?"}, called("Paris"),
                {"role": "user", "content": "Weather in Berlin?"}, called("Berlin"),
                {"role": "user", "content": "Weather in London?"}]
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                       tools=[TIME, WEATHER], temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "London"})]


def test_hermes_parsing_keeps_text_and_refuses_nothing_silently():
    body = ChatCompletionRequest(messages=ASK, tools=[WEATHER])
    plan = plan_tools(body, template_has_tools=True)
    call = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}
    text = f"Let me check.\n<tool_call>\n{json.dumps(call)}\n</tool_call>"
    content, calls = plan.parse(text)
    assert content == "Let me check." and json.loads(calls[0].function.arguments)["city"] == "Oslo"
    assert plan.parse("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])


@pytest.mark.parametrize(("extra", "param"), [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"suffix": "end"}, "suffix"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object",
                          "properties": {"a": {"$ref": "#/nowhere"}}}}}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_what_cannot_be_served_is_a_400_naming_it(server, extra, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60,
                   json={"messages": ASK, "max_tokens": 4, **extra})
    assert error_of(r, 400)["param"].startswith(param)  # e.g. response_format.type


def test_engine_api_takes_structured_outputs(dense_llm):
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                         "required": ["ok"]})
    out = dense_llm.generate(["Is water wet? Answer in JSON:"], SamplingParams(temperature=0, max_tokens=20,
                                                                             structured_outputs=spec))[0]
    assert isinstance(json.loads(out.outputs[0].text)["ok"], bool)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
