"""Tool calling for /v1/chat/completions.

`tool_choice` "required" or a named function is served by constraining the output to a JSON schema
(any model): a list of {"name", "arguments"} calls, one of the tools each, or the named function's
arguments. "auto" lets the model answer freely and reads Hermes-style `<tool_call>{...}</tool_call>`
blocks from its text; that needs a chat template that renders the tools (the model's or
--chat-template), and a template without tool support gets a 400 saying so. "none" is plain chat.
A template without tool support still gets the tools for "required" / named, as a system message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from needle.scheduler.sampling_params import StructuredOutputsParams
from needle.server.errors import bad_request
from needle.server.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's tool objects, for the template
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def structured(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            params = next(t["function"] for t in self.tools if t["function"]["name"] == self.name)
            return StructuredOutputsParams(json=params.get("parameters") or ANY_OBJECT)
        if self.mode != "required":
            return None
        calls = [{"type": "object",
                  "properties": {"name": {"const": t["function"]["name"]},
                                 "arguments": t["function"].get("parameters") or ANY_OBJECT},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def system_prompt(self) -> str:
        """The tools, as a system message, for templates that cannot render them."""
        listing = json.dumps([t["function"] for t in self.tools], ensure_ascii=False)
        return (f"You can call these functions (JSON): {listing}\nAnswer with the function call(s) "
                "as JSON.")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """-> (content, tool calls) of a finished choice; text that is not a valid call stays content."""
        try:
            if self.mode == "named":
                json.loads(text)
                return None, [ToolCall(function=FunctionCall(name=self.name, arguments=text))]
            if self.mode == "required":
                return None, [_call(c) for c in json.loads(text)]
        except (json.JSONDecodeError, KeyError, TypeError):  # cut short (finish_reason "length")
            return text, []
        if self.mode != "auto":
            return text, []
        calls = []
        for block in _TOOL_CALL.findall(text):
            try:
                calls.append(_call(json.loads(block)))
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []
        if not calls:
            return text, []
        content = _TOOL_CALL.sub("", text).strip()
        return content or None, calls


def _call(raw: dict[str, Any]) -> ToolCall:
    arguments = raw["arguments"]
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=str(raw["name"]), arguments=text))


def plan_tools(body: ChatCompletionRequest, template_has_tools: bool) -> ToolPlan:
    """What the request's tools and tool_choice ask for; 400 for what cannot be served."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return ToolPlan("none")
    tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool function names must be unique", param="tools")
    if isinstance(choice, str) or choice is None:
        mode = choice or "auto"
        name = None
    else:
        mode, name = "named", choice.function.name
        if name not in names:
            raise bad_request(f"tool_choice names function {name!r}, which is not among the tools",
                              param="tool_choice")
    if mode == "auto" and not template_has_tools:
        raise bad_request("tool_choice 'auto' needs a chat template that supports tools, and this model's "
                          "has none: use tool_choice 'required' or a named function (served by constrained "
                          "decoding), or start the server with --chat-template FILE (one that renders "
                          "`tools` and writes Hermes-style <tool_call> blocks)", param="tool_choice")
    if mode != "none" and body.response_format is not None and body.response_format.type != "text":
        raise bad_request("response_format cannot be combined with tools", param="response_format")
    return ToolPlan(mode, tools if mode != "none" else [], name, body.parallel_tool_calls)


def with_tool_prompt(messages: list[ChatMessage], plan: ToolPlan) -> list[ChatMessage]:
    """The messages with the tools described in the (first) system message."""
    text = plan.system_prompt()
    if messages and messages[0].template_role == "system":
        first = messages[0].model_copy(update={"content": messages[0].text() + "\n\n" + text})
        return [first, *messages[1:]]
    return [ChatMessage(role="system", content=text), *messages]
