"""Who may call what, and paying once: per-client model allow-lists, key rotation without
a restart, and Idempotency-Key replay (sequential and concurrent duplicates)."""

import concurrent.futures
import time

import openai
import pytest

from conftest import CLIENT_KEY, INTERN_KEY, http

MSG = [{"role": "user", "content": "hello"}]
FULL = "Hello from alpha. The quick brown fox jumps over the lazy dog."
TWO_MODELS = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}]},
              {"model": "gpt-4o-mini", "targets": [{"provider": "alpha"}]}]


def two_model_stack(stack, **policy):
    return stack(["alpha"], routes=TWO_MODELS, provider_extra={"alpha": {"models": ("gpt-4o", "gpt-4o-mini")}},
                 policy=policy)


def test_a_client_with_an_allow_list_gets_only_its_models(stack, client_for):
    auth = {"secretRef": {"name": "client-keys"}, "clients": [{"name": "intern", "models": ["gpt-4o-mini*"]},
                                                              {"name": "ghost", "models": ["gpt-4o-mini"]}]}
    gw, fakes = two_model_stack(stack, clientAuth=auth)
    intern, app = client_for(gw, key=INTERN_KEY), client_for(gw, key=CLIENT_KEY)

    with pytest.raises(openai.PermissionDeniedError) as err:
        intern.chat.completions.create(model="gpt-4o", messages=MSG)
    assert err.value.code == "model_not_allowed"
    assert '"intern"' in err.value.message and '"gpt-4o"' in err.value.message
    assert fakes["alpha"].attempts() == [], "a refused request costs no upstream call"

    assert intern.chat.completions.create(model="gpt-4o-mini", messages=MSG).choices[0].message.content == FULL
    assert app.chat.completions.create(model="gpt-4o", messages=MSG).choices[0].message.content == FULL
    assert [m.id for m in intern.models.list()] == ["gpt-4o-mini"]
    assert sorted(m.id for m in app.models.list()) == ["gpt-4o", "gpt-4o-mini"]
    with pytest.raises(openai.AuthenticationError):
        client_for(gw, key="not-a-key").models.list()
    warnings = gw.status()["config"]["warnings"]
    assert any('"ghost"' in w and "limits nobody" in w for w in warnings), warnings


def test_client_keys_rotate_without_a_restart(stack, client_for):
    gw, _ = stack(["alpha"])
    assert client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    path = gw.manifests_dir / "switchyard.yaml"
    path.write_text(path.read_text().replace(CLIENT_KEY, "rotated-key-51e0"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            client_for(gw, key="rotated-key-51e0").chat.completions.create(model="gpt-4o", messages=MSG)
            break
        except openai.AuthenticationError:
            time.sleep(0.1)
    else:
        pytest.fail("the rotated key was not accepted within 5s")
    with pytest.raises(openai.AuthenticationError):
        client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert gw.proc.poll() is None, "no restart"


def chat_with_key(client, key, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=kw.pop("messages", MSG), extra_headers={"Idempotency-Key": key}, **kw)
    return raw.parse(), raw.headers


def test_a_retried_request_gets_the_stored_answer_not_a_second_upstream_call(stack, client_for):
    gw, fakes = stack(["alpha"])
    client = client_for(gw)
    first, h1 = chat_with_key(client, "order-1")
    again, h2 = chat_with_key(client, "order-1")
    assert again.model_dump() == first.model_dump()
    assert h2.get("x-switchyard-idempotent-replay") == "true" and "x-switchyard-idempotent-replay" not in h1
    assert h2["x-switchyard-provider"] == "alpha"
    assert h2["x-request-id"] != h1["x-request-id"], "each request keeps its own id"
    assert len(fakes["alpha"].attempts()) == 1, "one billed call"

    other, _ = chat_with_key(client, "order-2")
    assert len(fakes["alpha"].attempts()) == 2, "a new key is a new request"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat_with_key(client, "order-1", messages=[{"role": "user", "content": "something else"}])
    assert err.value.code == "idempotency_key_reused"
    body = http("GET", f"{gw.url}/metrics")[2].decode()
    assert 'switchyard_gateway_idempotent_replays_total{route="gpt-4o"} 1' in body


def test_concurrent_duplicates_wait_for_the_first_and_share_its_answer(stack, client_for):
    gw, fakes = stack(["alpha"])
    fakes["alpha"].fault("slow-first-byte:1500", times=1)
    client = client_for(gw)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: chat_with_key(client, "dup-1"), range(4)))
    assert len(fakes["alpha"].attempts()) == 1, "the duplicates did not call upstream"
    contents = {r[0].choices[0].message.content for r in results}
    assert contents == {FULL}
    assert sum(r[1].get("x-switchyard-idempotent-replay") == "true" for r in results) == 3


def test_a_streamed_answer_is_replayed_whole(stack, client_for):
    gw, fakes = stack(["alpha"])
    client = client_for(gw)

    def streamed():
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gpt-4o", messages=MSG, stream=True, extra_headers={"Idempotency-Key": "s-1"}) if c.choices)

    assert streamed() == FULL
    assert streamed() == FULL
    assert len(fakes["alpha"].attempts()) == 1


def test_a_failed_answer_is_not_kept_so_the_retry_really_runs(stack, client_for):
    gw, fakes = stack(["alpha"])
    client = client_for(gw)
    fakes["alpha"].fault("status:400", times=1)
    with pytest.raises(openai.BadRequestError):
        chat_with_key(client, "retry-me")
    answer, headers = chat_with_key(client, "retry-me")
    assert answer.choices[0].message.content == FULL
    assert "x-switchyard-idempotent-replay" not in headers
    assert len(fakes["alpha"].attempts()) == 2


def test_a_stream_cut_short_is_not_kept(stack, client_for):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
    gw, fakes = stack(["alpha", "beta"], routes=routes, provider_extra={"beta": {"type_": "azureOpenAI"}})
    fakes["alpha"].fault("cut-after:3", times=1)
    client = client_for(gw)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                                extra_headers={"Idempotency-Key": "cut-1"}):
            pass
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gpt-4o", messages=MSG, stream=True, extra_headers={"Idempotency-Key": "cut-1"}) if c.choices)
    assert text == FULL, "the retry is served afresh, not the broken stream again"


def test_replay_is_off_when_the_window_is_zero(stack, client_for):
    gw, fakes = stack(["alpha"], policy={"idempotency": {"window": "0s"}})
    client = client_for(gw)
    chat_with_key(client, "k")
    _, headers = chat_with_key(client, "k")
    assert "x-switchyard-idempotent-replay" not in headers
    assert len(fakes["alpha"].attempts()) == 2


def test_a_body_with_two_models_cannot_be_routed_by_one_and_served_by_the_other(stack):
    auth = {"secretRef": {"name": "client-keys"}, "clients": [{"name": "intern", "models": ["gpt-4o-mini"]}]}
    gw, fakes = two_model_stack(stack, clientAuth=auth)
    raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini"}'
    status, _, _ = http("POST", f"{gw.url}/v1/chat/completions", raw,
                        {"authorization": f"Bearer {INTERN_KEY}", "content-type": "application/json"})
    assert status == 200
    [seen] = fakes["alpha"].attempts()
    assert seen["raw"].count('"model"') == 1, seen["raw"]
    assert seen["body"]["model"] == "gpt-4o-mini", "upstream gets the model the gateway routed and allowed"
