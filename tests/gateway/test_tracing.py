"""Traces: with an OTLP endpoint in the standard OTEL_* environment, every client request
is a server span and every try a client span under it, with the GenAI semantic-convention
attributes and the reason each failed try was failed over; the client's `traceparent`
is continued and passed to the provider. Spans are received by a real OTLP/HTTP
receiver."""

import secrets
import time

import openai
import pytest

from conftest import stream_text
from otlp_receiver import OtlpReceiver

MSG = [{"role": "user", "content": "hello"}]
FAST = {"timeouts": {"connect": "500ms", "firstByte": "1s", "streamIdle": "1s", "total": "20s"}}
TIERED = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.stop()


def otel_env(receiver, **extra):
    # A short batch delay so spans arrive within the test, not 5 s later.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100", **extra}


def traceparent():
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def by_parent(spans, parent):
    return [s for s in spans if s.parent_span_id == parent]


def test_a_failed_over_request_is_one_server_span_with_a_client_span_per_try(stack, client_for, receiver):
    gw, fakes = stack(["alpha", "beta"], routes=TIERED, policy=FAST, gateway_env=otel_env(receiver))
    fakes["alpha"].fault("status:503")
    trace_id, parent_id, header = traceparent()

    raw = client_for(gw).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSG, extra_headers={"traceparent": header})
    answer = raw.parse()
    assert raw.headers["x-switchyard-provider"] == "beta"

    spans = receiver.wait_for(3, trace_id)
    assert len(spans) == 3, spans
    [server] = by_parent(spans, parent_id)
    assert server.kind == "server", "the request span continues the client's trace"
    assert server.name == "chat gpt-4o"
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.response.model"] == "gpt-4o"
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["http.response.status_code"] == 200
    assert a["switchyard.provider"] == "beta"
    assert a["switchyard.attempts"] == 2
    assert "error.type" not in a
    assert server.resource["service.name"] == "switchyard-gateway"

    tries = by_parent(spans, server.span_id)
    assert sorted(t.attributes["switchyard.provider"] for t in tries) == ["alpha", "beta"]
    failed = next(t for t in tries if t.attributes["switchyard.provider"] == "alpha")
    served = next(t for t in tries if t.attributes["switchyard.provider"] == "beta")
    for t in tries:
        assert t.kind == "client"
        assert t.attributes["gen_ai.operation.name"] == "chat"
        assert t.attributes["gen_ai.provider.name"] == "openai_compatible"
        assert t.attributes["gen_ai.request.model"] == "gpt-4o"
        assert t.attributes["server.address"] == "127.0.0.1"
    assert failed.status == "error"
    assert failed.attributes["error.type"] == "server_error"
    assert failed.attributes["http.response.status_code"] == 503
    assert "alpha" in failed.attributes["switchyard.failover.reason"]
    assert served.status != "error" and "error.type" not in served.attributes
    assert served.attributes["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens

    # Each provider got the trace, with its own try as the parent.
    [alpha_seen] = fakes["alpha"].client_tries()
    [beta_seen] = fakes["beta"].client_tries()
    assert alpha_seen["headers"]["traceparent"] == f"00-{trace_id}-{failed.span_id}-01"
    assert beta_seen["headers"]["traceparent"] == f"00-{trace_id}-{served.span_id}-01"
    assert receiver.content_types[0] == "application/x-protobuf"


def test_a_stream_resumed_elsewhere_ends_its_span_with_the_whole_answer(stack, client_for, receiver):
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"},
                                              {"provider": "claude", "model": "claude-sonnet-4", "priority": 1}]}]
    gw, fakes = stack(["alpha", "claude"], routes=routes, policy=FAST, gateway_env=otel_env(receiver),
                      provider_extra={"claude": {"type_": "anthropic", "models": ["claude-sonnet-4"]}})
    fakes["alpha"].fault("cut-after:5")
    trace_id, parent_id, header = traceparent()
    text, usage, _ = stream_text(client_for(gw), stream_options={"include_usage": True},
                                 extra_headers={"traceparent": header})
    assert text.endswith("lazy dog.")

    spans = receiver.wait_for(3, trace_id, until=lambda got: by_parent(got, parent_id))
    [server] = by_parent(spans, parent_id)
    tries = by_parent(spans, server.span_id)
    assert len(tries) == 2, tries
    broken, continued = sorted(tries, key=lambda t: t.attributes.get("switchyard.continuation", False))
    assert broken.attributes["error.type"] == "stream_broken"
    assert broken.attributes["switchyard.provider"] == "alpha"
    assert continued.attributes["switchyard.continuation"] is True
    assert continued.attributes["gen_ai.provider.name"] == "anthropic"
    assert continued.attributes["gen_ai.request.model"] == "claude-sonnet-4"
    assert "error.type" not in continued.attributes
    assert server.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert server.attributes["http.response.status_code"] == 200
    assert "error.type" not in server.attributes


def test_a_request_nothing_could_serve_is_an_error_span(stack, client_for, receiver):
    gw, fakes = stack(["alpha"], policy=FAST, gateway_env=otel_env(receiver))
    fakes["alpha"].fault("status:500")
    trace_id, parent_id, header = traceparent()
    with pytest.raises(openai.APIStatusError):
        client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, extra_headers={"traceparent": header})
    spans = receiver.wait_for(2, trace_id, until=lambda got: by_parent(got, parent_id))
    [server] = by_parent(spans, parent_id)
    assert server.status == "error"
    assert server.attributes["error.type"] == str(server.attributes["http.response.status_code"])
    tries = by_parent(spans, server.span_id)
    assert tries and all(t.attributes["error.type"] == "server_error" for t in tries)


def test_sampling_follows_the_ratio_and_the_clients_decision(stack, client_for, receiver):
    env = otel_env(receiver, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    gw, fakes = stack(["alpha"], gateway_env=env)
    client = client_for(gw)
    for _ in range(5):
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    trace_id, _, header = traceparent()
    client.chat.completions.create(model="gpt-4o", messages=MSG, extra_headers={"traceparent": header})
    spans = receiver.wait_for(2, trace_id)
    assert len(spans) == 2, "a client's sampled trace is recorded whatever the ratio"
    time.sleep(0.5)
    assert all(s.trace_id == trace_id for s in receiver.spans), "ratio 0 records no trace of its own"
    # Unsampled requests still carry a trace context upstream, marked as not sampled.
    first = fakes["alpha"].client_tries()[0]
    assert first["headers"]["traceparent"].endswith("-00")


def test_tracing_is_off_without_an_endpoint_or_when_disabled(stack, client_for, receiver):
    _, _, header = traceparent()
    for env in ({}, otel_env(receiver, OTEL_SDK_DISABLED="true")):
        gw, fakes = stack(["alpha"], gateway_env=env)
        client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, extra_headers={"traceparent": header})
        assert fakes["alpha"].client_tries()[0]["headers"]["traceparent"] is None, env
        assert "exporting traces" not in gw.output(), env
        gw.stop()
    time.sleep(1)
    assert receiver.spans == [], "a disabled gateway exported nothing, even when stopping"


def test_an_unsupported_export_protocol_stops_the_gateway_with_an_error_naming_it(stack, receiver, tmp_path):
    with pytest.raises(RuntimeError, match="exited early"):
        stack(["alpha"], gateway_env=otel_env(receiver, OTEL_EXPORTER_OTLP_PROTOCOL="grpc"))
    log = (tmp_path / "gateway.log").read_text()
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc" in log and "http/protobuf" in log, log


def test_spans_still_queued_are_exported_when_the_gateway_stops(stack, client_for, receiver):
    gw, _ = stack(["alpha"], gateway_env=otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000"))
    trace_id, _, header = traceparent()
    client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, extra_headers={"traceparent": header})
    time.sleep(0.3)
    assert receiver.spans == [], "the batch is not due yet"
    gw.stop()
    assert len(receiver.wait_for(2, trace_id, timeout=5)) == 2
