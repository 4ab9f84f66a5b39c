"""The Anthropic translation checked against an independent implementation, LiteLLM, so
our translator and our fake cannot share a misunderstanding of the Messages API.

For each request, the same OpenAI-style request goes (a) through the gateway with the
openai SDK and (b) through litellm.completion straight to the same fake Anthropic
endpoint. Both must send Anthropic an equivalent request (compared after normalising
layout choices both forms of which Anthropic accepts, such as a string versus one text
block) and must hand the client the same answer: text, tool calls, finish reason, usage."""

import json
import subprocess

import pytest

from conftest import REPO

ORACLE_PYTHON = REPO / ".venv-litellm" / "bin" / "python"
ORACLE = REPO / "tests" / "gateway" / "litellm_oracle.py"
CLAUDE = {"type_": "anthropic", "models": ["claude-sonnet-4"]}
WEATHER = [{"type": "function", "function": {
    "name": "weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "toolu_b", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Rome\"}"}}]},
    {"role": "tool", "tool_call_id": "toolu_a", "content": "12C and rain"},
    {"role": "tool", "tool_call_id": "toolu_b", "content": "24C and sun"},
]

CASES = {
    "system-and-sampling": dict(
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}],
        max_tokens=50, temperature=0.3, top_p=0.9, stop=["END"]),
    "multi-turn": dict(messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a fact."}]}]),
    "image": dict(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}}]}]),
    "tool-call": dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER, tool_choice="required"),
    "named-tool": dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER,
                       tool_choice={"type": "function", "function": {"name": "weather"}}),
    "tool-results": dict(messages=HISTORY, tools=WEATHER),
    "stream-text": dict(messages=[{"role": "user", "content": "hello"}], stream=True,
                        stream_options={"include_usage": True}),
    "stream-tool-call": dict(messages=[{"role": "user", "content": "Weather?"}], tools=WEATHER, stream=True,
                             stream_options={"include_usage": True}),
}


def oracle(api_base, request):
    assert ORACLE_PYTHON.exists(), f"{ORACLE_PYTHON} is missing; tests/run.sh installs it"
    spec = json.dumps({"api_base": api_base, "request": dict(request, model="claude-sonnet-4")})
    done = subprocess.run([str(ORACLE_PYTHON), str(ORACLE)], input=spec, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def through_gateway(client, request):
    if not request.get("stream"):
        answer = client.chat.completions.create(model="gpt-4o", **request)
        choice = answer.choices[0]
        return {
            "content": choice.message.content or "",
            "finish_reason": choice.finish_reason,
            "tool_calls": [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                           for c in choice.message.tool_calls or []],
            "usage": {"prompt_tokens": answer.usage.prompt_tokens, "completion_tokens": answer.usage.completion_tokens},
        }
    text, finish, usage, calls = "", None, None, {}
    for chunk in client.chat.completions.create(model="gpt-4o", **request):
        if chunk.usage:
            usage = {"prompt_tokens": chunk.usage.prompt_tokens, "completion_tokens": chunk.usage.completion_tokens}
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
    return {"content": text, "finish_reason": finish, "usage": usage,
            "tool_calls": [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()]}


def blocks(content):
    """Content in its block form: Anthropic treats "x" and [{"type": "text", "text": "x"}] alike."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out = []
    for block in content:
        block = {k: v for k, v in block.items() if k != "cache_control"}
        if block.get("type") == "tool_result":
            inner = block.get("content", "")
            block["content"] = "".join(b.get("text", "") for b in blocks(inner))
        out.append(block)
    return out


def normalise(body):
    system = body.get("system")
    if isinstance(system, list):
        system = "\n\n".join(b["text"] for b in system)
    messages = []
    for m in body["messages"]:
        content = blocks(m["content"])
        if messages and messages[-1]["role"] == m["role"]:
            messages[-1]["content"] += content
        else:
            messages.append({"role": m["role"], "content": content})
    tools = [{k: t[k] for k in ("name", "description", "input_schema") if k in t} for t in body.get("tools", [])]
    choice = body.get("tool_choice") or ({"type": "auto"} if tools else None)
    return {
        "system": system or None,
        "messages": messages,
        "max_tokens": body.get("max_tokens"),
        "stop_sequences": body.get("stop_sequences"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "stream": bool(body.get("stream")),
        "tools": tools,
        "tool_choice": choice,
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gateway_and_litellm_translate_alike(stack, client_for, case):
    request = CASES[case]
    routes = [{"model": "gpt-4o", "targets": [{"provider": "claude", "model": "claude-sonnet-4"}]}]
    gw, fakes = stack(["claude"], routes=routes, provider_extra={"claude": CLAUDE})
    fake = fakes["claude"]

    ours = through_gateway(client_for(gw), request)
    [our_request] = fake.attempts()
    theirs = oracle(fake.url + "/v1/messages", request)
    their_request = fake.attempts()[-1]
    assert their_request["path"] == "/v1/messages" and their_request["seq"] == 1

    assert normalise(our_request["body"]) == normalise(their_request["body"])
    assert ours == theirs
    assert ours["usage"] and ours["usage"]["prompt_tokens"] > 0
