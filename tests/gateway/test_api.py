"""The API surface: auth, errors, limits, other operations, reloads and shutdown."""

import json
import signal
import threading
import time

import openai
import pytest

from conftest import CLIENT_KEY, http, manifests, provider

MSG = [{"role": "user", "content": "hello"}]


def test_missing_or_wrong_key_gets_401_in_openai_shape(stack, client_for):
    gw, _ = stack(["alpha"])
    with pytest.raises(openai.AuthenticationError) as err:
        client_for(gw, key="nope").chat.completions.create(model="gpt-4o", messages=MSG)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    status, _, body = http("POST", f"{gw.url}/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
    assert status == 401 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_models_lists_the_routed_models(stack, client_for):
    gw, _ = stack(["alpha"])
    models = [m.id for m in client_for(gw).models.list()]
    assert models == ["gpt-4o"]


def test_unknown_model_is_404_pointing_at_the_model_list(stack, client_for):
    gw, _ = stack(["alpha"])
    with pytest.raises(openai.NotFoundError) as err:
        client_for(gw).chat.completions.create(model="gpt-9", messages=MSG)
    assert "/v1/models" in str(err.value)


def test_malformed_json_is_400_naming_the_problem(stack):
    gw, _ = stack(["alpha"])
    status, _, body = http("POST", f"{gw.url}/v1/chat/completions", b'{"model": "gpt-4o",', {"authorization": f"Bearer {CLIENT_KEY}"})
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "invalid_json" and "EOF" in error["message"]


def test_oversized_body_is_413(stack):
    """Without a declared length (chunked), the limit holds while reading; a declared one
    over the limit is refused before reading (test_limits.py)."""
    import socket

    gw, _ = stack(["alpha"])
    host, port = gw.url.removeprefix("http://").split(":")
    chunk = b"x" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {CLIENT_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        try:
            for _ in range(17):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-upload, as it should be
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head[:80]
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_completions_and_embeddings_are_served(stack, client_for):
    gw, _ = stack(["alpha"])
    client = client_for(gw)
    assert client.completions.create(model="gpt-4o", prompt="hi").choices[0].text.startswith("Hello from alpha")
    assert len(client.embeddings.create(model="gpt-4o", input="hi").data[0].embedding) == 4


def test_azure_deployments_get_their_path_api_version_and_api_key(stack, client_for):
    gw, fakes = stack(["az"], provider_extra={"az": {"type_": "azureOpenAI"}})
    answer = client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert answer.choices[0].message.content.startswith("Hello from az")
    seen = fakes["az"].attempts()[0]
    assert seen["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert seen["query"] == "api-version=2024-10-21"
    assert seen["headers"]["api-key"] == "<redacted>"


def test_readyz_healthz_metrics_status(stack, client_for):
    gw, _ = stack(["alpha"])
    client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert http("GET", f"{gw.url}/healthz")[0] == 200
    assert http("GET", f"{gw.url}/readyz")[0] == 200
    _, _, metrics = http("GET", f"{gw.url}/metrics")
    text = metrics.decode()
    assert 'switchyard_gateway_requests_total{route="gpt-4o",status="200"} 1' in text
    assert 'switchyard_gateway_attempts_total{provider="alpha",outcome="success"} 1' in text
    assert 'switchyard_gateway_provider_usable{provider="alpha"} 1' in text
    assert 'switchyard_gateway_breaker_state{provider="alpha"} 0' in text
    assert 'switchyard_gateway_added_latency_seconds_count{route="gpt-4o"} 1' in text
    assert gw.status()["providers"][0]["health"]["state"] == "healthy"


def test_metrics_name_the_configured_route_never_the_model_a_client_made_up(stack, client_for):
    gw, _ = stack(["alpha"], routes=[{"model": "gpt-*", "targets": [{"provider": "alpha"}]}])
    client = client_for(gw)
    for n in range(3):
        client.chat.completions.create(model=f"gpt-made-up-{n}", messages=MSG)
    text = http("GET", f"{gw.url}/metrics")[2].decode()
    assert 'switchyard_gateway_requests_total{route="gpt-*",status="200"} 3' in text
    assert "made-up" not in text


def test_a_bad_update_keeps_the_last_good_config_and_a_good_one_applies_within_a_second(stack, client_for, tmp_path):
    gw, fakes = stack(["alpha"])
    client = client_for(gw)
    path = gw.manifests_dir / "switchyard.yaml"
    good = path.read_text()
    path.write_text(good.replace('"routes": [', '"routes": [{"model": "broken", "targets": [{"provider": "nobody"}]}, '))
    time.sleep(1.5)
    state = gw.status()["config"]
    assert "nobody" in (state["lastError"] or ""), state
    assert client.chat.completions.create(model="gpt-4o", messages=MSG).choices[0].message.content
    path.write_text("kind: ProviderPool\nspec: [not, a, pool")
    time.sleep(1.5)
    assert gw.status()["config"]["lastError"], "the bad update is reported"
    assert client.chat.completions.create(model="gpt-4o", messages=MSG).choices[0].message.content
    p = provider("alpha", fakes["alpha"].url, models=("gpt-4o", "gpt-4o-mini"))
    routes = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}]}, {"model": "gpt-4o-mini", "targets": [{"provider": "alpha"}]}]
    path.write_text(manifests([p], routes))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if "gpt-4o-mini" in gw.status()["routes"]:
            break
        time.sleep(0.1)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MSG).choices[0].message.content
    assert gw.status()["config"]["lastError"] is None


def test_sigterm_finishes_requests_in_flight(stack, client_for):
    gw, fakes = stack(["alpha"], policy={"timeouts": {"firstByte": "10s"}})
    fakes["alpha"].fault("slow-first-byte:1500")
    result = {}

    def call():
        result["answer"] = client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    gw.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert result["answer"].choices[0].message.content.startswith("Hello from alpha")
    assert gw.proc.wait(10) == 0


def test_sigterm_keeps_serving_not_ready_for_the_shutdown_delay(stack, client_for):
    from http.client import HTTPConnection

    gw, _ = stack(["alpha"], gateway_args=("--shutdown-delay-seconds", "2"))
    host, port = gw.url.removeprefix("http://").split(":")
    kept_alive = HTTPConnection(host, int(port), timeout=5)
    kept_alive.request("GET", "/readyz")
    first = kept_alive.getresponse()
    first.read()
    assert first.status == 200 and first.getheader("connection") != "close"
    gw.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Still serving, new connections included, but no longer ready.
    assert http("GET", f"{gw.url}/readyz")[0] == 503
    answer = client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert answer.choices[0].message.content.startswith("Hello from alpha")
    # A keep-alive client is told to reconnect (elsewhere) on its next answer.
    kept_alive.request("GET", "/healthz")
    reply = kept_alive.getresponse()
    reply.read()
    assert reply.status == 200 and reply.getheader("connection") == "close"
    kept_alive.close()
    assert gw.proc.poll() is None, "the gateway waits out its delay"
    assert gw.proc.wait(10) == 0
    assert "still serving while endpoints stop sending here" in gw.output()


def test_oversized_headers_are_refused(stack):
    import socket

    gw, _ = stack(["alpha"])
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 * 1024) + b"\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:80]


def test_http2_cleartext_is_served(stack):
    import shutil
    import subprocess

    if not shutil.which("curl"):
        pytest.fail("curl is needed for the h2c check")
    gw, _ = stack(["alpha"])
    out = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
         "-H", "authorization: Bearer " + __import__("conftest").CLIENT_KEY,
         "-d", json.dumps({"model": "gpt-4o", "messages": MSG}), f"{gw.url}/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out == "2 200", out


def test_providers_are_reached_over_verified_tls_with_http2(stack, client_for, tmp_path):
    # The fake's CA is private: the gateway trusts it only through --ca-file.
    ca = tmp_path / "tls-alpha" / "ca.pem"
    gw, fakes = stack(["alpha"], tls={"alpha"}, gateway_args=["--ca-file", str(ca)])
    assert fakes["alpha"].url.startswith("https://")
    answer = client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert answer.choices[0].message.content.startswith("Hello from alpha")
    text = "".join(c.choices[0].delta.content or "" for c in client_for(gw).chat.completions.create(
        model="gpt-4o", messages=MSG, stream=True) if c.choices)
    assert text.startswith("Hello from alpha")
    assert {a["version"] for a in fakes["alpha"].attempts()} == {"HTTP/2.0"}, "HTTP/2 by ALPN"


def test_a_provider_certificate_nobody_vouches_for_is_refused(stack, client_for):
    gw, fakes = stack(["alpha"], tls={"alpha"}, policy={"retry": {"attempts": 1}})
    with pytest.raises(openai.InternalServerError) as err:
        client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)
    assert "certificate" in str(err.value).lower(), str(err.value)
    assert fakes["alpha"].attempts() == [], "no request went over the unverified connection"


def test_a_ca_file_without_certificates_stops_start_up_naming_it(tmp_path):
    import subprocess
    from conftest import TARGET
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    (tmp_path / "m.yaml").write_text("")
    done = subprocess.run([str(TARGET / "switchyard-gateway"), "--manifests", str(tmp_path / "m.yaml"), "--region", "r",
                           "--listen", "127.0.0.1:0", "--ca-file", str(bad)], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert str(bad) in done.stderr and "no PEM certificate" in done.stderr, done.stderr


def test_a_pool_that_no_policy_serves_says_so_in_the_404(tmp_path):
    from conftest import FakeProvider, Gateway, manifests, provider

    fake = FakeProvider("alpha", tmp_path)
    docs = manifests([provider("alpha", fake.url)], []).split("\n---\n")
    # The Secrets and the pool, without the RoutingPolicy.
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "switchyard.yaml").write_text("\n---\n".join(d for d in docs if '"RoutingPolicy"' not in d))
    gw = Gateway(mdir, tmp_path)
    try:
        status, _, body = http("POST", f"{gw.url}/v1/chat/completions", {"model": "gpt-4o", "messages": MSG},
                               headers={"Content-Type": "application/json"})
        assert status == 404, body
        assert "no RoutingPolicy serves this gateway's ProviderPool" in json.loads(body)["error"]["message"]
    finally:
        gw.stop()
        fake.stop()


def test_the_readmes_standalone_example_serves_through_the_sdk(tmp_path, client_for):
    # examples/local/ as the README runs it, with the fake provider where port 9001 is.
    from conftest import REPO, FakeProvider, Gateway
    fake = FakeProvider("local", tmp_path)
    text = (REPO / "examples/local/switchyard.yaml").read_text()
    assert "http://127.0.0.1:9001" in text
    mdir = tmp_path / "local"
    mdir.mkdir()
    (mdir / "switchyard.yaml").write_text(text.replace("http://127.0.0.1:9001", fake.url))
    gw = Gateway(mdir, tmp_path, region="local")
    try:
        answer = client_for(gw, key="local-client-key").chat.completions.create(model="gpt-4o", messages=MSG)
        assert answer.choices[0].message.content.startswith("Hello from local.")
        fake.fault("status:503")
        with pytest.raises(openai.APIStatusError):
            client_for(gw, key="local-client-key").chat.completions.create(model="gpt-4o", messages=MSG)
    finally:
        gw.stop()
        fake.stop()
