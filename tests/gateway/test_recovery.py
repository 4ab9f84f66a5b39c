"""Health per provider × model, and recovery found by the gateway's own checks, through the
official openai SDK: a 429 on one model rests only that model; another model's successes
do not hide a failing one; a provider that was taken out serves again within seconds of
recovering, and no client request is spent on finding out."""

import time

from conftest import http

MSG = [{"role": "user", "content": "hello"}]
FAST = {"timeouts": {"connect": "500ms", "firstByte": "1s", "streamIdle": "1s", "total": "20s"}}


def chat(client, model="gpt-4o"):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG)
    return raw.parse(), raw.headers


def counter(gw, name, **labels):
    _, _, body = http("GET", f"{gw.url}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(f"switchyard_gateway_{name}_total{{") and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def two_models(stack, **policy):
    """alpha serves gpt-4o and gpt-4o-mini first; beta is the second tier of both."""
    models = ("gpt-4o", "gpt-4o-mini")
    routes = [{"model": m, "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]} for m in models]
    extra = {"alpha": {"models": models}, "beta": {"models": models}}
    return stack(["alpha", "beta"], routes=routes, policy=dict(FAST, **policy), provider_extra=extra)


def test_a_rate_limit_rests_only_the_model_that_hit_it(stack, client_for):
    gw, fakes = two_models(stack, retry={"attempts": 1})
    fakes["alpha"].fault("status:429:retry-after=30", model="gpt-4o", times=1)
    client = client_for(gw)
    _, headers = chat(client, "gpt-4o")
    assert headers["x-switchyard-provider"] == "beta", "a 30 s rest is longer than the request waits"
    for _ in range(3):
        _, headers = chat(client, "gpt-4o-mini")
        assert headers["x-switchyard-provider"] == "alpha", "gpt-4o-mini was not limited"
    _, headers = chat(client, "gpt-4o")
    assert headers["x-switchyard-provider"] == "beta" and headers["x-switchyard-attempts"] == "1", \
        "gpt-4o on alpha rests for the 30 s it was asked to"
    models = {m["model"]: m for m in
              next(p for p in gw.status()["providers"] if p["name"] == "alpha")["health"]["models"]}
    assert models["gpt-4o"]["reason"] == "RateLimited" and models["gpt-4o-mini"]["state"] == "healthy", models


def test_a_fallback_on_the_same_provider_does_not_hide_the_failing_primary(stack, client_for):
    # gpt-4o fails on alpha, and its fallback gpt-4o-mini on alpha answers: the fallback's
    # successes used to reset gpt-4o's failure count, so every request paid a failed try.
    models = ("gpt-4o", "gpt-4o-mini")
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}], "fallbacks": ["gpt-4o-mini"]},
              {"model": "gpt-4o-mini", "targets": [{"provider": "alpha"}]}]
    policy = dict(FAST, retry={"attempts": 1}, circuitBreaker={"consecutiveFailures": 2, "openFor": "60s"})
    gw, fakes = stack(["alpha"], routes=routes, policy=policy,
                      provider_extra={"alpha": {"models": models}})
    fakes["alpha"].fault("status:500", model="gpt-4o")
    client = client_for(gw)
    served = [chat(client) for _ in range(6)]
    assert all(answer.model == "gpt-4o-mini" for answer, _ in served)
    assert [h["x-switchyard-attempts"] for _, h in served[2:]] == ["1"] * 4, \
        "after two failures gpt-4o's breaker is open and the fallback serves at once"
    failed = [a for a in fakes["alpha"].client_tries() if a["model"] == "gpt-4o"]
    assert len(failed) == 2, f"{len(failed)} client requests paid a try on the broken model"


def test_a_flapping_provider_serves_again_within_seconds_and_no_client_pays_to_find_out(stack, client_for):
    # openFor is a minute: without recovery checks alpha would stay out that long, then
    # a real request would have to find out whether it is back.
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
    policy = dict(FAST, retry={"attempts": 1}, circuitBreaker={"consecutiveFailures": 1, "openFor": "60s"})
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=policy)
    down = 2.0
    fakes["alpha"].fault(f"flap:{int(down * 1000)}")
    up_at = time.monotonic() + down
    client = client_for(gw)
    _, headers = chat(client)
    assert headers["x-switchyard-provider"] == "beta", "alpha's 503 failed over"
    served_by = []
    deadline = up_at + 10
    while time.monotonic() < deadline:
        _, headers = chat(client)
        served_by.append((time.monotonic(), headers["x-switchyard-provider"]))
        if headers["x-switchyard-provider"] == "alpha":
            break
        time.sleep(0.05)
    back = [t for t, p in served_by if p == "alpha"]
    assert back, "alpha never served again"
    recovered_after = back[0] - up_at
    assert recovered_after <= 5.0, f"alpha served again {recovered_after:.1f} s after it recovered"
    assert all(p == "beta" for t, p in served_by if t < back[0])
    tries = fakes["alpha"].client_tries()
    failed = [a for a in tries if a["fault"]]
    assert len(failed) == 1, f"{len(failed)} client requests met the outage; only the first should"
    assert counter(gw, "recovery_checks", provider="alpha", result="passed") == 1
    assert counter(gw, "recovery_checks", provider="alpha", result="failed") >= 1
    checks = [a for a in fakes["alpha"].attempts() if a["headers"]["x-request-id"] == "switchyard-recovery-check"]
    assert checks and all(c["body"]["max_tokens"] == 1 for c in checks), "a check is a one-token completion"
    # Its only model was out, so the provider was: the log says so, and that it is back.
    logged = time.monotonic() + 3
    while "provider back in rotation" not in gw.output() and time.monotonic() < logged:
        time.sleep(0.1)
    assert "provider taken out of rotation" in gw.output()
    assert "provider back in rotation" in gw.output()


def test_a_provider_that_refuses_connections_is_checked_with_its_model_list(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
    policy = dict(FAST, retry={"attempts": 1}, circuitBreaker={"consecutiveFailures": 1, "openFor": "60s"})
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=policy)
    fakes["alpha"].fault("reset", times=3)
    client = client_for(gw)
    _, headers = chat(client)
    assert headers["x-switchyard-provider"] == "beta"
    health = next(p for p in gw.status()["providers"] if p["name"] == "alpha")["health"]
    assert health["state"] == "ejected" and health["breaker"] == "open", health
    time.sleep(2.5)
    _, headers = chat(client)
    assert headers["x-switchyard-provider"] == "alpha", "back once a model-list check got an answer"
    paths = [(a["method"], a["path"]) for a in fakes["alpha"].attempts()]
    assert ("GET", "/v1/models") in paths
    assert len(fakes["alpha"].client_tries()) == 2


def test_recovery_checks_can_be_turned_off(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
    policy = dict(FAST, retry={"attempts": 1}, circuitBreaker={"consecutiveFailures": 1, "openFor": "1500ms"})
    gw, fakes = stack(["alpha", "beta"], routes=routes, policy=policy,
                      provider_extra={"alpha": {"health": {"recovery": {"request": "none"}}}})
    fakes["alpha"].fault("flap:200")
    client = client_for(gw)
    chat(client)
    time.sleep(1.0)
    _, headers = chat(client)
    assert headers["x-switchyard-provider"] == "beta", "without checks alpha waits out openFor"
    assert all(a["method"] == "POST" for a in fakes["alpha"].attempts())
    time.sleep(0.7)
    _, headers = chat(client)
    assert headers["x-switchyard-provider"] == "alpha", "then a real request half-opens the breaker"
