"""The gateway rescues the request in flight: every fault of the fake provider, driven
through the gateway with the official openai SDK, ends with the client holding the
complete answer, or a clean bounded error when nothing healthy is left."""

import time

import openai
import pytest

from conftest import CLIENT_KEY, PROVIDER_KEY, http, stream_text

FULL = "The quick brown fox jumps over the lazy dog."
MSG = [{"role": "user", "content": "hello"}]
FAST = {"timeouts": {"connect": "500ms", "firstByte": "1s", "streamIdle": "1s", "total": "20s"}}
TIERED = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]


def chat(client, **kw):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, **kw)
    return raw.parse(), raw.headers


def test_serves_a_complete_answer_and_names_who_served(stack, client_for):
    gw, fakes = stack(["alpha"])
    answer, headers = chat(client_for(gw))
    assert answer.choices[0].message.content == f"Hello from alpha. {FULL}"
    assert answer.usage.total_tokens > 0
    assert headers["x-switchyard-provider"] == "alpha"
    assert headers["x-switchyard-attempts"] == "1"
    assert headers["x-switchyard-region"] == "us-east"
    seen = fakes["alpha"].attempts()
    assert len(seen) == 1
    assert seen[0]["headers"]["authorization"] == "Bearer <redacted>", "the provider key is sent"
    assert seen[0]["headers"]["x-request-id"] == headers["x-request-id"], "the request id is propagated"


@pytest.mark.parametrize(
    "fault",
    ["status:500", "status:502", "status:503", "status:504", "status:429", "status:429:retry-after=5",
     "reset", "hang", "slow-first-byte:3000", "cut-after:2"],
)
def test_fails_over_to_secondary_tier_on_fault(stack, client_for, fault):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault(fault)
    started = time.monotonic()
    answer, headers = chat(client_for(gw))
    elapsed = time.monotonic() - started
    assert answer.choices[0].message.content == f"Hello from beta. {FULL}"
    assert headers["x-switchyard-provider"] == "beta"
    assert headers["x-switchyard-attempts"] == "2"
    assert len(fakes["alpha"].attempts()) == 1, "the failed provider is tried once, not hammered"
    assert len(fakes["beta"].attempts()) == 1
    # A silent provider costs the first-byte timeout (1s), nothing more.
    assert elapsed < 2.5, f"failover took {elapsed:.2f}s"


@pytest.mark.parametrize("fault", ["status:503", "reset", "hang", "slow-first-byte:3000"])
def test_streams_fail_over_invisibly_before_the_first_byte(stack, client_for, fault):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault(fault)
    text, usage, _ = stream_text(client_for(gw), stream_options={"include_usage": True})
    assert text == f"Hello from beta. {FULL}"
    assert usage is not None and usage.total_tokens > 0


def test_a_malformed_chunk_is_skipped_not_forwarded(stack, client_for):
    gw, fakes = stack(["alpha"])
    fakes["alpha"].fault("malformed-after:3")
    text, _, _ = stream_text(client_for(gw))
    assert text == f"Hello from alpha. {FULL}"


def test_a_stream_without_done_is_finalised_with_usage(stack, client_for):
    gw, fakes = stack(["alpha"])
    fakes["alpha"].fault("no-done")
    text, usage, _ = stream_text(client_for(gw), stream_options={"include_usage": True})
    assert text == f"Hello from alpha. {FULL}"
    assert usage is not None


@pytest.mark.parametrize("fault", ["cut-after:5", "stall-after:5"])
def test_a_stream_broken_mid_answer_is_resumed_on_a_provider_that_continues_prefills(stack, client_for, fault):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault(fault)
    text, usage, _ = stream_text(client_for(gw), stream_options={"include_usage": True})
    assert text == f"Hello from alpha. {FULL}", "one complete answer, no repetition"
    assert usage is not None
    continuation = fakes["beta"].attempts()[0]["body"]
    assert continuation["messages"][-1] == {"role": "assistant", "content": "Hello from alpha. The quick "}
    assert continuation["continue_final_message"] is True


@pytest.mark.parametrize("fault", ["cut-after:3", "stall-after:3"])
def test_a_stream_broken_mid_answer_ends_with_an_explicit_error_when_no_target_can_continue(stack, client_for, fault):
    # Azure OpenAI cannot continue a prefill, so nothing can resume the answer.
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST, provider_extra={"beta": {"type_": "azureOpenAI"}})
    fakes["alpha"].fault(fault)
    received = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            for choice in chunk.choices:
                received += choice.delta.content or ""
    assert "incomplete" in str(err.value)
    assert received and not received.endswith("dog."), "part of the answer arrived before the break"
    assert fakes["beta"].attempts() == [], "no continuation is attempted on a target that cannot continue"
    _, _, metrics = http("GET", f"{gw.url}/metrics")
    assert 'switchyard_gateway_stream_breaks_total{route="gpt-4o",reason="interrupted"} 1' in metrics.decode()


def test_a_continuation_target_refusing_the_prefill_leaves_the_original_failure(stack, client_for):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault("cut-after:3")
    fakes["beta"].fault("status:400")
    with pytest.raises(openai.APIError) as err:
        for _ in client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            pass
    assert len(fakes["beta"].attempts()) == 1, "the continuation was tried"
    assert "incomplete" in str(err.value)
    assert "400" not in str(err.value), "the continuation's refusal is not what the client sees"


def test_retry_after_is_honoured_and_the_provider_rests_exactly_that_long(stack, client_for):
    routes = [{"model": "gpt-4o", "strategy": "roundRobin", "targets": [{"provider": "alpha"}, {"provider": "beta"}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=FAST)
    fakes["alpha"].fault("status:429:retry-after=2", times=1)
    client = client_for(gw)
    for _ in range(6):
        answer, _ = chat(client)
        assert answer.choices[0].message.content.endswith(FULL)
    rate_limited_at = fakes["alpha"].attempts()[0]["atMs"]
    alpha = fakes["alpha"].attempts()
    assert len(alpha) == 1, f"alpha was tried again within its Retry-After: {len(alpha)} attempts"
    time.sleep(2.2)
    for _ in range(4):
        chat(client)
    again = [a for a in fakes["alpha"].attempts() if a["atMs"] > rate_limited_at]
    assert again and again[0]["atMs"] - rate_limited_at >= 2000, "alpha serves again once Retry-After has passed"


def test_an_open_breaker_spares_the_dead_provider_real_requests(stack, client_for):
    policy = dict(FAST, circuitBreaker={"consecutiveFailures": 2, "openFor": "60s"})
    routes = [{"model": "gpt-4o", "strategy": "roundRobin", "targets": [{"provider": "alpha"}, {"provider": "beta"}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=policy)
    fakes["alpha"].fault("reset")
    client = client_for(gw)
    for _ in range(20):
        answer, headers = chat(client)
        assert headers["x-switchyard-provider"] == "beta"
    assert len(fakes["alpha"].attempts()) == 2, "after the breaker opens no request pays a try on alpha"
    health = {p["name"]: p["health"] for p in gw.status()["providers"]}
    assert health["alpha"]["breaker"] == "open"
    assert health["alpha"]["state"] == "ejected"


def test_a_flapping_provider_comes_back_after_its_breaker_half_opens(stack, client_for):
    policy = dict(FAST, circuitBreaker={"consecutiveFailures": 1, "openFor": "1s"})
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=policy)
    fakes["alpha"].fault("flap:500")
    client = client_for(gw)
    _, headers = chat(client)
    assert headers["x-switchyard-provider"] == "beta"
    time.sleep(1.2)
    _, headers = chat(client)
    assert headers["x-switchyard-provider"] == "alpha", "the breaker closes again after a good probe"


@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_client_errors_fail_fast_without_retry(stack, client_for, code):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault(f"status:{code}")
    with pytest.raises(openai.APIStatusError) as err:
        chat(client_for(gw))
    assert err.value.status_code == code
    assert fakes["beta"].attempts() == []


def test_context_length_goes_straight_to_the_larger_model(stack, client_for):
    routes = [
        {"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta"}], "onContextLengthExceeded": {"model": "big"}},
        {"model": "big", "targets": [{"provider": "gamma"}]},
    ]
    gw, fakes = stack(["alpha", "beta", "gamma"], routes=routes,
                      provider_extra={"gamma": {"models": ["big"]}}, policy=FAST)
    fakes["alpha"].fault("context-length")
    fakes["beta"].fault("context-length")
    answer, headers = chat(client_for(gw))
    assert headers["x-switchyard-provider"] == "gamma"
    assert answer.choices[0].message.content.startswith("Hello from gamma")
    assert len(fakes["alpha"].attempts()) + len(fakes["beta"].attempts()) == 1, "the same model is not retried"
    assert fakes["gamma"].attempts()[0]["model"] == "big"


def test_content_policy_refusals_are_not_retried_and_reach_the_client(stack, client_for):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault("content-policy")
    with pytest.raises(openai.BadRequestError) as err:
        chat(client_for(gw))
    assert "safety system" in str(err.value)
    assert fakes["beta"].attempts() == []


def test_content_policy_refusals_get_the_configured_response(stack, client_for):
    routes = [dict(TIERED[0], onContentPolicy={"response": "I can't help with that."})]
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=FAST)
    fakes["alpha"].fault("content-policy")
    answer, _ = chat(client_for(gw))
    assert answer.choices[0].message.content == "I can't help with that."


def test_fallback_models_serve_when_every_target_failed(stack, client_for):
    routes = [
        {"model": "gpt-4o", "targets": [{"provider": "alpha"}], "fallbacks": ["backup"]},
        {"model": "backup", "targets": [{"provider": "beta"}]},
    ]
    gw, fakes = stack(["alpha", "beta"], routes=routes, provider_extra={"beta": {"models": ["backup"]}}, policy=FAST)
    fakes["alpha"].fault("status:503")
    answer, headers = chat(client_for(gw))
    assert headers["x-switchyard-provider"] == "beta"
    assert answer.model == "backup", "the response names the model that actually served"


def test_nothing_healthy_gives_a_clean_bounded_error(stack, client_for):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault("reset")
    fakes["beta"].fault("status:503")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        chat(client_for(gw))
    assert err.value.status_code == 503
    assert "no provider could serve" in str(err.value)
    assert time.monotonic() - started < 5


def test_degraded_response_when_nothing_can_serve(stack, client_for):
    policy = dict(FAST, degradedResponse={"status": 200, "message": "We are busy; please retry shortly."})
    gw, fakes = stack(["alpha"], policy=policy)
    fakes["alpha"].fault("status:503")
    answer, _ = chat(client_for(gw))
    assert answer.choices[0].message.content == "We are busy; please retry shortly."


def test_the_retry_budget_stops_retries_from_multiplying_an_outage(stack, client_for):
    # A same-target retry waits at least the 100 ms backoff, longer than maxRetryAfter here:
    # every retry is a failover, and the budget alone limits them.
    policy = dict(FAST, retry={"attempts": 3, "budget": 0.1, "maxRetryAfter": "50ms"},
                  circuitBreaker={"consecutiveFailures": 1000, "minRequests": 100000})
    routes = [{"model": "gpt-4o", "strategy": "roundRobin", "targets": [{"provider": "alpha"}, {"provider": "beta"}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=policy, provider_extra={
        "alpha": {"health": {"passive": {"consecutiveFailures": 1000}}},
        "beta": {"health": {"passive": {"consecutiveFailures": 1000}}}})
    fakes["alpha"].fault("status:503")
    fakes["beta"].fault("status:503")
    client = client_for(gw)
    started = time.monotonic()
    for _ in range(300):
        with pytest.raises(openai.InternalServerError):
            chat(client)
    assert time.monotonic() - started < 10, "the whole loop stays inside one budget window"
    total = len(fakes["alpha"].attempts()) + len(fakes["beta"].attempts())
    # Without a budget every request would try both providers (600 tries). With it: 300
    # first tries plus at most the floor (100) and 10% of the requests (30).
    assert 300 <= total <= 430, total


def test_secrets_never_appear_in_gateway_output(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1},
                                              {"provider": "claude", "model": "claude-sonnet-4", "priority": 2}]}]
    gw, fakes = stack(["alpha", "beta", "claude"], routes=routes, policy=FAST,
                      provider_extra={"beta": {"type_": "azureOpenAI"},
                                      "claude": {"type_": "anthropic", "models": ["claude-sonnet-4"]}})
    fakes["alpha"].fault("reset")
    fakes["beta"].fault("status:500")
    fakes["claude"].fault("status:401")
    with pytest.raises(openai.APIError):
        chat(client_for(gw))
    assert len(fakes["claude"].attempts()) == 1, "every dialect was tried with the key"
    with pytest.raises(openai.AuthenticationError):
        chat(client_for(gw, key="wrong-key"))
    _, _, status = http("GET", f"{gw.url}/status")
    _, _, metrics = http("GET", f"{gw.url}/metrics")
    gw.stop()
    everything = gw.output() + status.decode() + metrics.decode()
    assert PROVIDER_KEY not in everything
    assert CLIENT_KEY not in everything


@pytest.mark.parametrize("dialect", ["openaiCompatible", "anthropic"])
def test_active_probes_take_a_failing_provider_out_before_real_traffic_and_bring_it_back(stack, client_for, dialect):
    probe = {"type_": dialect, "health": {"active": {"interval": "200ms", "timeout": "150ms", "healthyThreshold": 2, "unhealthyThreshold": 2}}}
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST, provider_extra={"alpha": probe})
    fakes["alpha"].fault("status:503")
    time.sleep(1.0)
    answer, headers = chat(client_for(gw))
    assert headers["x-switchyard-provider"] == "beta" and headers["x-switchyard-attempts"] == "1"
    chats = [a for a in fakes["alpha"].attempts() if a["method"] == "POST"]
    assert chats == [], "no real request paid for discovering the outage"
    assert {a["path"] for a in fakes["alpha"].attempts()} == {"/v1/models"}
    if dialect == "anthropic":
        assert fakes["alpha"].attempts()[0]["headers"]["x-api-key"] == "<redacted>"
        assert fakes["alpha"].attempts()[0]["headers"]["anthropic-version"] == "2023-06-01"
    fakes["alpha"].clear()
    time.sleep(1.0)
    _, headers = chat(client_for(gw))
    assert headers["x-switchyard-provider"] == "alpha", "two good probes bring it back"


def test_failovers_are_counted_for_the_alerts(stack, client_for):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST)
    fakes["alpha"].fault("status:503", times=1)
    chat(client_for(gw))
    _, _, metrics = http("GET", f"{gw.url}/metrics")
    text = metrics.decode()
    assert 'switchyard_gateway_failovers_total{route="gpt-4o",reason="provider"} 1' in text
    assert 'switchyard_gateway_failovers_total{route="gpt-4o",reason="model"} 0' in text
    assert 'switchyard_gateway_attempts_total{provider="alpha",outcome="server_error"} 1' in text


def test_capacity_routing_follows_the_quota_providers_report(stack, client_for):
    routes = [{"model": "gpt-4o", "strategy": "capacity", "targets": [{"provider": "alpha"}, {"provider": "beta"}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=FAST)
    fakes["alpha"].fault("quota:40:1000")
    fakes["beta"].fault("quota:600:1000")
    client = client_for(gw)
    for _ in range(8):
        chat(client)
    # One request each teaches the gateway their quotas; then beta, with 60% left, takes
    # everything while alpha has 4%.
    assert len(fakes["alpha"].attempts()) == 1, [a["seq"] for a in fakes["alpha"].attempts()]
    assert len(fakes["beta"].attempts()) == 7


def regional_stack(stack, mode):
    routes = [{"model": "gpt-4o", "strategy": "roundRobin", "targets": [{"provider": "alpha"}, {"provider": "beta"}]}]
    return stack(["alpha", "beta"], routes=routes, policy=dict(FAST, regional=mode),
                 provider_extra={"beta": {"region": "eu-west"}})


def test_prefer_local_spills_to_another_region_only_when_the_local_provider_fails(stack, client_for):
    gw, fakes = regional_stack(stack, "preferLocal")
    client = client_for(gw)
    regions = {chat(client)[1]["x-switchyard-provider-region"] for _ in range(4)}
    assert regions == {"us-east"}
    assert fakes["beta"].attempts() == []
    fakes["alpha"].fault("status:503")
    _, headers = chat(client)
    assert (headers["x-switchyard-provider"], headers["x-switchyard-provider-region"]) == ("beta", "eu-west")


def test_local_only_never_leaves_the_region(stack, client_for):
    gw, fakes = regional_stack(stack, "localOnly")
    fakes["alpha"].fault("status:503")
    with pytest.raises(openai.InternalServerError):
        chat(client_for(gw))
    assert fakes["beta"].attempts() == []


def test_global_spreads_across_regions(stack, client_for):
    gw, fakes = regional_stack(stack, "global")
    client = client_for(gw)
    served = [chat(client)[1]["x-switchyard-provider"] for _ in range(4)]
    assert sorted(served) == ["alpha", "alpha", "beta", "beta"]


def test_a_provider_that_turned_slow_is_ejected_before_it_times_out(stack, client_for):
    slow = {"health": {"passive": {"consecutiveFailures": 2, "slowThreshold": "200ms"}}}
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST, provider_extra={"alpha": slow})
    fakes["alpha"].fault("slow-first-byte:400")
    client = client_for(gw)
    served = [chat(client)[1]["x-switchyard-provider"] for _ in range(4)]
    assert served == ["alpha", "alpha", "beta", "beta"], "slow answers are served, then the slow provider is avoided"
    assert {p["name"]: p for p in gw.status()["providers"]}["alpha"]["health"]["reason"] == "Ejected"
