"""The usage metrics platform teams ask for, read from /metrics after real SDK calls:
tokens in and out per client, route and provider (matching what the answers' usage
said), time to first token for streams, and requests rescued or lost after a failed try.
Labels come from configuration only."""

from conftest import http, stream_text

MSG = [{"role": "user", "content": "hello"}]
TIERED = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]


def sample(gw, name, **labels):
    """The value of one series (0 when absent); labels must match exactly those given."""
    _, _, body = http("GET", f"{gw.url}/metrics")
    for line in body.decode().splitlines():
        if not line.startswith(f"switchyard_gateway_{name}{{"):
            continue
        got = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.rindex("}")].split(","))
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_tokens_are_counted_per_client_route_and_provider_as_usage_reported(stack, client_for):
    gw, _ = stack(["alpha"])
    answer = client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    labels = {"route": "gpt-4o", "provider": "alpha", "client": "app"}
    assert sample(gw, "tokens_total", token_type="input", **labels) == answer.usage.prompt_tokens
    assert sample(gw, "tokens_total", token_type="output", **labels) == answer.usage.completion_tokens
    # A stream with usage reported at its end counts the same way.
    _, usage, _ = stream_text(client_for(gw), stream_options={"include_usage": True})
    assert sample(gw, "tokens_total", token_type="output", **labels) == \
        answer.usage.completion_tokens + usage.completion_tokens
    _, _, body = http("GET", f"{gw.url}/metrics")
    assert 'client="intern"' not in body.decode(), "only clients that asked appear"


def test_a_stream_records_its_time_to_first_token(stack, client_for):
    gw, fakes = stack(["alpha"])
    fakes["alpha"].fault("slow-first-byte:200")
    stream_text(client_for(gw))
    assert sample(gw, "time_to_first_token_seconds_count", route="gpt-4o") == 1
    assert sample(gw, "time_to_first_token_seconds_bucket", route="gpt-4o", le="0.1") == 0, \
        "the first token came after the provider's 200 ms"
    assert sample(gw, "time_to_first_token_seconds_bucket", route="gpt-4o", le="1.0") == 1


def test_requests_rescued_and_lost_after_a_failed_try_are_counted(stack, client_for):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy={"retry": {"attempts": 1}})
    client = client_for(gw)
    client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert sample(gw, "rescues_total", route="gpt-4o", result="rescued") == 0, "no failed try, no rescue"
    fakes["alpha"].fault("status:503", times=1)
    client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert sample(gw, "rescues_total", route="gpt-4o", result="rescued") == 1
    fakes["alpha"].fault("status:503")
    fakes["beta"].fault("status:503")
    status, _, _ = http("POST", f"{gw.url}/v1/chat/completions", {"model": "gpt-4o", "messages": MSG},
                        headers={"authorization": f"Bearer {client.api_key}", "content-type": "application/json"})
    assert status == 503
    assert sample(gw, "rescues_total", route="gpt-4o", result="lost") == 1
