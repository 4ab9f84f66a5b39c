"""Anthropic behind the OpenAI API: the official openai SDK talks to the gateway, the
gateway talks Anthropic's Messages API to a fake that is as strict as the real one (it
refuses unknown fields, a missing max_tokens, non-alternating turns, a system role inside
messages), and the client cannot tell which provider answered."""

import json

import openai
import pytest

from conftest import http

FULL = "The quick brown fox jumps over the lazy dog."
MSG = [{"role": "user", "content": "hello"}]
FAST = {"timeouts": {"connect": "500ms", "firstByte": "1s", "streamIdle": "1s", "total": "20s"}}
CLAUDE = {"type_": "anthropic", "models": ["claude-sonnet-4"]}
WEATHER = [{"type": "function", "function": {
    "name": "weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def claude_only(stack, **kw):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "claude", "model": "claude-sonnet-4"}]}]
    return stack(["claude"], routes=routes, policy=FAST, provider_extra={"claude": CLAUDE}, **kw)


def stream_all(client, **kw):
    text, usage, finish, calls = "", None, None, {}
    for chunk in client.chat.completions.create(model="gpt-4o", stream=True, **kw):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                slot["name"] += (call.function.name or "") if call.function else ""
                slot["arguments"] += (call.function.arguments or "") if call.function else ""
    return text, usage, finish, calls


def test_a_chat_completion_is_served_by_anthropic_in_openai_shape(stack, client_for):
    gw, fakes = claude_only(stack)
    raw = client_for(gw).chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        temperature=1.7, stop=["END"], user="u-42", seed=3, frequency_penalty=0.5,
        logprobs=False, response_format={"type": "text"})
    answer = raw.parse()
    assert answer.choices[0].message.content == f"Hello from claude. {FULL}"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == "claude-sonnet-4", "the model that actually served"
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert raw.headers["x-switchyard-provider"] == "claude"

    [seen] = fakes["claude"].attempts()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == "<redacted>", "the key travels as x-api-key"
    assert seen["headers"]["authorization"] is None, "and not as a bearer token"
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    body = seen["body"]
    assert body["system"] == "Be brief."
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["max_tokens"] == 4096, "the pool's default, since the client set none"
    assert body["temperature"] == 1.0, "OpenAI's 0-2 scale is clamped to Anthropic's 0-1"
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-42"}
    for dropped in ("seed", "frequency_penalty", "logprobs", "response_format", "user", "stop"):
        assert dropped not in body


def test_max_tokens_and_multi_part_content_are_translated(stack, client_for):
    gw, fakes = claude_only(stack)
    client_for(gw).chat.completions.create(
        model="gpt-4o", max_completion_tokens=64,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}]}])
    body = fakes["claude"].attempts()[0]["body"]
    assert body["max_tokens"] == 64
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.png"}},
    ]


def test_a_stream_is_translated_chunk_by_chunk_with_usage_at_the_end(stack, client_for):
    gw, fakes = claude_only(stack)
    text, usage, finish, _ = stream_all(client_for(gw), messages=MSG, stream_options={"include_usage": True})
    assert text == f"Hello from claude. {FULL}"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == len(text.split())
    [seen] = fakes["claude"].attempts()
    assert seen["body"]["stream"] is True
    assert "stream_options" not in seen["body"]


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_calls_and_tool_results_round_trip(stack, client_for, streamed):
    gw, fakes = claude_only(stack)
    client = client_for(gw)
    if streamed:
        _, _, finish, calls = stream_all(client, messages=MSG, tools=WEATHER, tool_choice="required")
        [call] = calls.values()
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        answer = client.chat.completions.create(model="gpt-4o", messages=MSG, tools=WEATHER,
                                                tool_choice={"type": "function", "function": {"name": "weather"}},
                                                parallel_tool_calls=False)
        finish = answer.choices[0].finish_reason
        [call] = answer.choices[0].message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert finish == "tool_calls"
    assert name == "weather" and json.loads(arguments) == {"city": "Paris"}
    first = fakes["claude"].attempts()[0]["body"]
    assert first["tools"] == [{"name": "weather", "description": "Current weather in a city",
                               "input_schema": WEATHER[0]["function"]["parameters"]}]
    expected_choice = {"type": "any"} if streamed else {"type": "tool", "name": "weather", "disable_parallel_tool_use": True}
    assert first["tool_choice"] == expected_choice

    followup = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "18C and sunny"},
    ]
    answer = client.chat.completions.create(model="gpt-4o", messages=followup, tools=WEATHER)
    assert answer.choices[0].message.content == f"Hello from claude. {FULL}"
    sent = fakes["claude"].attempts()[-1]["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": call_id, "name": "weather", "input": {"city": "Paris"}}]}
    assert sent[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call_id, "content": "18C and sunny"}]}


@pytest.mark.parametrize("fault", ["status:529", "status:500", "reset", "status:429:retry-after=5"])
def test_anthropic_overload_and_rate_limits_fail_over_like_their_openai_equivalents(stack, client_for, fault):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "claude", "model": "claude-sonnet-4"},
                                              {"provider": "beta", "priority": 1}]}]
    gw, fakes = stack(["claude", "beta"], routes=routes, policy=FAST, provider_extra={"claude": CLAUDE})
    fakes["claude"].fault(fault)
    raw = client_for(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.parse().choices[0].message.content == f"Hello from beta. {FULL}"
    assert raw.headers["x-switchyard-attempts"] == "2"
    assert len(fakes["claude"].attempts()) == 1
    if fault.startswith("status:429"):
        for _ in range(3):
            client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
        assert len(fakes["claude"].attempts()) == 1, "a rate-limited Anthropic rests for its retry-after"


def test_when_only_anthropic_is_left_its_overload_reaches_the_client_as_a_503(stack, client_for):
    gw, fakes = claude_only(stack)
    fakes["claude"].fault("status:529")
    with pytest.raises(openai.APIStatusError) as err:
        client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert err.value.status_code == 503
    assert "Overloaded" in str(err.value)


def test_a_prompt_too_long_for_claude_goes_to_the_larger_model(stack, client_for):
    routes = [
        {"model": "gpt-4o", "targets": [{"provider": "claude", "model": "claude-sonnet-4"}],
         "onContextLengthExceeded": {"model": "big"}},
        {"model": "big", "targets": [{"provider": "beta"}]},
    ]
    gw, fakes = stack(["claude", "beta"], routes=routes, policy=FAST,
                      provider_extra={"claude": CLAUDE, "beta": {"models": ["big"]}})
    fakes["claude"].fault("context-length")
    answer = client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert answer.choices[0].message.content == f"Hello from beta. {FULL}"
    assert len(fakes["claude"].attempts()) == 1


def test_a_refusal_is_a_content_filter_finish_or_the_configured_response(stack, client_for):
    gw, fakes = claude_only(stack)
    fakes["claude"].fault("content-policy")
    answer = client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert answer.choices[0].finish_reason == "content_filter"

    routes = [{"model": "gpt-4o", "targets": [{"provider": "claude", "model": "claude-sonnet-4"}],
               "onContentPolicy": {"response": "I can't help with that."}}]
    gw2, fakes2 = stack(["claude"], routes=routes, policy=FAST, provider_extra={"claude": CLAUDE})
    fakes2["claude"].fault("content-policy")
    answer = client_for(gw2).chat.completions.create(model="gpt-4o", messages=MSG)
    assert answer.choices[0].message.content == "I can't help with that."


@pytest.mark.parametrize("fault", ["cut-after:5", "stall-after:5", "error-after:5"])
def test_a_broken_anthropic_stream_is_resumed_elsewhere(stack, client_for, fault):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "claude", "model": "claude-sonnet-4"},
                                              {"provider": "beta", "priority": 1}]}]
    gw, fakes = stack(["claude", "beta"], routes=routes, policy=FAST, provider_extra={"claude": CLAUDE})
    fakes["claude"].fault(fault)
    text, usage, finish, _ = stream_all(client_for(gw), messages=MSG, stream_options={"include_usage": True})
    assert text == f"Hello from claude. {FULL}", "one complete answer, no repetition"
    assert finish == "stop" and usage is not None


def test_an_openai_compatible_stream_broken_mid_answer_is_resumed_on_anthropic(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"},
                                              {"provider": "claude", "model": "claude-sonnet-4", "priority": 1}]}]
    gw, fakes = stack(["alpha", "claude"], routes=routes, policy=FAST, provider_extra={"claude": CLAUDE})
    fakes["alpha"].fault("cut-after:5")
    text, usage, _, _ = stream_all(client_for(gw), messages=MSG, stream_options={"include_usage": True})
    assert text == f"Hello from alpha. {FULL}"
    assert usage is not None
    prefill = fakes["claude"].attempts()[0]["body"]["messages"][-1]
    # Anthropic refuses a prefill ending in whitespace, so the trailing space is dropped.
    assert prefill == {"role": "assistant", "content": "Hello from alpha. The quick"}


def test_an_anthropic_stream_broken_with_nobody_to_continue_ends_with_an_error_event(stack, client_for):
    gw, fakes = claude_only(stack)
    fakes["claude"].fault("error-after:3")
    received = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            for choice in chunk.choices:
                received += choice.delta.content or ""
    assert "Overloaded" in str(err.value) and "incomplete" in str(err.value)
    assert received and not received.endswith("dog.")


def test_embeddings_are_not_sent_to_anthropic(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "claude", "model": "claude-sonnet-4"},
                                              {"provider": "beta", "priority": 1}]}]
    gw, fakes = stack(["claude", "beta"], routes=routes, policy=FAST, provider_extra={"claude": CLAUDE})
    out = client_for(gw).embeddings.create(model="gpt-4o", input="hi")
    assert len(out.data[0].embedding) == 4
    assert fakes["claude"].attempts() == []


@pytest.mark.parametrize("streamed", [False, True])
def test_one_policy_fails_over_openai_then_azure_then_anthropic(stack, client_for, streamed):
    """The issue's acceptance test: one public model, three provider dialects."""
    routes = [{"model": "gpt-4o", "targets": [
        {"provider": "openai"},
        {"provider": "azure", "priority": 1},
        {"provider": "claude", "model": "claude-sonnet-4", "priority": 2}]}]
    gw, fakes = stack(["openai", "azure", "claude"], routes=routes, policy=FAST,
                      provider_extra={"openai": {"type_": "openai"}, "azure": {"type_": "azureOpenAI"}, "claude": CLAUDE})
    fakes["openai"].fault("status:503")
    fakes["azure"].fault("status:429:retry-after=30")
    client = client_for(gw)
    if streamed:
        text, usage, finish, _ = stream_all(client, messages=MSG, stream_options={"include_usage": True})
        assert (text, finish) == (f"Hello from claude. {FULL}", "stop")
        assert usage is not None and usage.total_tokens > 0
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        answer = raw.parse()
        assert answer.choices[0].message.content == f"Hello from claude. {FULL}"
        assert answer.usage.total_tokens > 0
        assert raw.headers["x-switchyard-provider"] == "claude"
        assert raw.headers["x-switchyard-attempts"] == "3"
    assert fakes["openai"].attempts()[0]["path"] == "/v1/chat/completions"
    assert fakes["azure"].attempts()[0]["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert fakes["claude"].attempts()[0]["path"] == "/v1/messages"


def test_the_fake_is_as_strict_as_anthropic(stack):
    """The fake refuses what the real API refuses, so a translator bug cannot hide."""
    _, fakes = claude_only(stack)
    url = fakes["claude"].url + "/v1/messages"
    ok_headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "content-type": "application/json"}
    good = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    assert http("POST", url, good, ok_headers)[0] == 200
    for bad, needle in [
        (dict(good, seed=1), "seed: Extra inputs"),
        ({k: v for k, v in good.items() if k != "max_tokens"}, "max_tokens"),
        (dict(good, messages=[{"role": "system", "content": "x"}]), "messages.0.role"),
        (dict(good, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), "alternate"),
        (dict(good, messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b "}]), "trailing whitespace"),
        (dict(good, temperature=1.5), "temperature"),
    ]:
        status, _, body = http("POST", url, bad, ok_headers)
        assert status == 400 and needle in json.loads(body)["error"]["message"], (bad, body)
    assert http("POST", url, good, {"content-type": "application/json"})[0] == 401
