"""What a request tries before it gives up, through the official openai SDK: every usable
target of every tier, the same target again when it is the only one left (after the
Retry-After it asked for, or a backoff), the fallback model when the wait is too long, a
first-token deadline for streams, a final error that lists every try, and a broken
stream resumed on a fallback model."""

import json
import time

from conftest import CLIENT_KEY, http, stream_text

MSG = [{"role": "user", "content": "hello"}]
FULL = "The quick brown fox jumps over the lazy dog."


def metrics(gw):
    _, _, body = http("GET", f"{gw.url}/metrics")
    return body.decode()


def chat(client, model="gpt-4o"):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG)
    return raw.parse(), raw.headers


def test_every_target_of_every_tier_is_tried_whatever_the_attempts(stack, client_for):
    # Three endpoints of the model down and a substitute one tier lower: with three
    # attempts the substitute used to be out of reach.
    routes = [{"model": "gpt-4o", "targets": [{"provider": "p1"}, {"provider": "p2"}, {"provider": "p3"},
                                              {"provider": "sub", "priority": 1}]}]
    gw, fakes = stack(["p1", "p2", "p3", "sub"], routes=routes, policy={"retry": {"attempts": 3}})
    for name in ("p1", "p2", "p3"):
        fakes[name].fault("status:503")
    answer, headers = chat(client_for(gw))
    assert answer.choices[0].message.content == f"Hello from sub. {FULL}"
    assert headers["x-switchyard-provider"] == "sub"
    assert headers["x-switchyard-attempts"] == "4"
    assert [len(fakes[n].attempts()) for n in ("p1", "p2", "p3")] == [1, 1, 1]


def test_the_final_error_lists_every_try_in_the_body_and_a_header(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy={"retry": {"attempts": 1}})
    fakes["alpha"].fault("status:500")
    fakes["beta"].fault("reset")
    status, headers, raw = http("POST", f"{gw.url}/v1/chat/completions", {"model": "gpt-4o", "messages": MSG},
                                headers={"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"})
    assert status == 503, raw
    body = json.loads(raw)
    assert headers["x-switchyard-failures"] == "alpha:server_error, beta:connect_error"
    message = body["error"]["message"]
    assert "after 2 tries" in message, message
    assert "try 1: alpha answered 500" in message and "try 2: beta: " in message, message


def test_a_lone_target_is_tried_again_after_the_retry_after_it_asked_for(stack, client_for):
    gw, fakes = stack(["alpha"])
    fakes["alpha"].fault("status:429:retry-after=1", times=1)
    started = time.monotonic()
    answer, headers = chat(client_for(gw))
    elapsed = time.monotonic() - started
    assert answer.choices[0].message.content == f"Hello from alpha. {FULL}"
    assert headers["x-switchyard-attempts"] == "2"
    assert len(fakes["alpha"].attempts()) == 2
    assert 0.9 <= elapsed < 3, f"answered after {elapsed:.2f}s; the provider asked for 1s"


def test_a_lone_target_is_tried_again_after_a_backoff_on_a_server_error(stack, client_for):
    gw, fakes = stack(["alpha"])
    fakes["alpha"].fault("status:500", times=1)
    started = time.monotonic()
    answer, headers = chat(client_for(gw))
    elapsed = time.monotonic() - started
    assert answer.choices[0].message.content == f"Hello from alpha. {FULL}"
    assert headers["x-switchyard-attempts"] == "2"
    tries = fakes["alpha"].attempts()
    gap = tries[1]["atMs"] - tries[0]["atMs"]
    assert 85 <= gap < 1000, f"tried again {gap} ms later; the backoff starts at 100 ms ± 10%"
    assert elapsed < 2


def test_a_rest_longer_than_max_retry_after_goes_to_the_fallback_model_at_once(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}], "fallbacks": ["gpt-4o-mini"]},
              {"model": "gpt-4o-mini", "targets": [{"provider": "beta"}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy={"retry": {"maxRetryAfter": "2s"}},
                      provider_extra={"beta": {"models": ("gpt-4o-mini",)}})
    fakes["alpha"].fault("status:429:retry-after=30")
    started = time.monotonic()
    answer, headers = chat(client_for(gw))
    assert time.monotonic() - started < 2, "no wait for a 30 s rest"
    assert headers["x-switchyard-provider"] == "beta"
    assert len(fakes["alpha"].attempts()) == 1
    assert 'switchyard_gateway_failovers_total{route="gpt-4o",reason="model"} 1' in metrics(gw)


def test_a_stream_without_a_token_by_first_token_fails_over_though_first_byte_is_generous(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
    policy = {"timeouts": {"firstByte": "30s", "firstToken": "1s", "total": "60s"}}
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=policy)
    # Headers at once, then nothing but keep-alive comments.
    fakes["alpha"].fault("comments:100")
    started = time.monotonic()
    text, _, _ = stream_text(client_for(gw))
    elapsed = time.monotonic() - started
    assert text == f"Hello from beta. {FULL}"
    assert 0.9 <= elapsed < 4, f"failed over after {elapsed:.2f}s; firstToken is 1s"


def test_a_stream_broken_mid_answer_resumes_on_a_fallback_model_when_its_route_has_no_other_target(
        stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}], "fallbacks": ["gpt-4o-mini"]},
              {"model": "gpt-4o-mini", "targets": [{"provider": "beta"}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, provider_extra={"beta": {"models": ("gpt-4o-mini",)}},
                      policy={"timeouts": {"connect": "500ms", "firstByte": "1s", "streamIdle": "1s", "total": "20s"}})
    fakes["alpha"].fault("cut-after:5")
    text, _, models = stream_text(client_for(gw))
    assert text == f"Hello from alpha. {FULL}", "one complete answer, no repetition"
    assert models == {"gpt-4o", "gpt-4o-mini"}, "each part names the model that served it"
    continuation = fakes["beta"].attempts()[0]["body"]
    assert continuation["model"] == "gpt-4o-mini"
    assert continuation["messages"][-1]["role"] == "assistant"
    assert continuation["messages"][-1]["content"].startswith("Hello from alpha.")
    text = metrics(gw)
    assert 'switchyard_gateway_stream_breaks_total{route="gpt-4o",reason="resumed"} 1' in text
    assert 'switchyard_gateway_attempts_total{provider="alpha",outcome="stream_broken"} 1' in text


def test_the_log_says_when_a_provider_leaves_and_rejoins_the_rotation(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes)
    fakes["alpha"].fault("status:429:retry-after=2", times=1)
    _, headers = chat(client_for(gw))
    assert headers["x-switchyard-provider"] == "beta"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "back in rotation" not in gw.output():
        time.sleep(0.2)
    log = gw.output()
    out, back = log.find("provider taken out of rotation"), log.find("provider back in rotation")
    assert 0 <= out < back, log[-2000:]
    assert "RateLimited" in log[out:back], "the line says why"


THREE_TIERS = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1},
                                               {"provider": "gamma", "priority": 2}]}]


def test_a_model_that_refuses_a_continuation_is_learned_and_skipped(stack, client_for):
    gw, fakes = stack(["alpha", "beta", "gamma"], routes=THREE_TIERS)
    fakes["alpha"].fault("cut-after:3")
    fakes["beta"].fault("no-prefill")
    client = client_for(gw)
    for _ in range(2):
        text, _, _ = stream_text(client)
        assert text == f"Hello from alpha. {FULL}", "the refusal never reaches the client"
    asked = [a for a in fakes["beta"].client_tries() if "continue_final_message" in a["body"]]
    assert len(asked) == 1, f"beta was asked to continue {len(asked)} times; once teaches the gateway"
    assert len(fakes["gamma"].client_tries()) == 2
    assert "refused to continue a partial answer" in gw.output()


def test_a_model_declared_unable_to_continue_is_never_asked(stack, client_for):
    extra = {"beta": {"models": [{"name": "gpt-4o", "continuation": "none"}]}}
    gw, fakes = stack(["alpha", "beta", "gamma"], routes=THREE_TIERS, provider_extra=extra)
    fakes["alpha"].fault("cut-after:3")
    text, _, _ = stream_text(client_for(gw))
    assert text == f"Hello from alpha. {FULL}"
    assert fakes["beta"].client_tries() == [], "beta said it cannot continue"
    assert len(fakes["gamma"].client_tries()) == 1
