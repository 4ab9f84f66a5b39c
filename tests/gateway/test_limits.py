"""Every client is bounded before it costs anything: header, idle and body timeouts, a
connection cap with a clear refusal, and no body read for a client without a key."""

import json
import socket
import time

from conftest import CLIENT_KEY, http

LIMITS = ("--header-timeout-seconds", "2", "--body-timeout-seconds", "2")


def connect(gw):
    host, port = gw.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(sock, seconds, trickle=None):
    """Seconds until the peer closes `sock` (sending `trickle` every 0.5 s meanwhile), or
    None if it is still open after `seconds`."""
    start = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                sock.sendall(trickle)
            data = sock.recv(65536)
            if data == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    return None


def read_response(sock):
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def test_a_slowloris_client_is_cut_off_at_the_header_timeout(stack):
    gw, _ = stack(["alpha"], gateway_args=LIMITS)
    with connect(gw) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        took = closed_within(s, 8, trickle=b"X")
    assert took is not None and took < 5, f"a header trickled a byte at a time kept the connection {took}"


def test_an_idle_keep_alive_connection_is_closed(stack):
    gw, _ = stack(["alpha"], gateway_args=LIMITS)
    with connect(gw) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 200
        took = closed_within(s, 8)
    assert took is not None and took < 5, "an idle keep-alive connection stayed open"


def test_a_body_shorter_than_declared_times_out(stack):
    gw, _ = stack(["alpha"], gateway_args=LIMITS)
    with connect(gw) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"model":'
        )
        start = time.monotonic()
        status, body = read_response(s)
    assert status == 408, body
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert time.monotonic() - start < 5


def test_a_client_without_a_key_is_refused_before_its_body_is_read(stack):
    gw, _ = stack(["alpha"])
    with connect(gw) as s:
        # Fifteen megabytes declared, none sent: the answer must not wait for them.
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 15000000\r\n\r\n"
        )
        start = time.monotonic()
        status, body = read_response(s)
    assert status == 401, body
    assert time.monotonic() - start < 1


def test_a_wrong_key_gets_401_not_the_routes(stack):
    gw, _ = stack(["alpha"])
    status, _, body = http(
        "POST",
        f"{gw.url}/v1/chat/completions",
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"},
    )
    assert status == 401, body


def test_a_declared_body_over_the_limit_is_refused_before_reading(stack):
    gw, _ = stack(["alpha"], gateway_args=("--max-body-bytes", "1000"))
    with connect(gw) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: 100000000\r\n\r\n".encode()
        )
        start = time.monotonic()
        status, body = read_response(s)
    assert status == 413, body
    assert time.monotonic() - start < 1


def test_connections_beyond_the_cap_get_a_clear_refusal(stack, client_for):
    gw, _ = stack(["alpha"], gateway_args=("--max-connections", "3"))
    held = [connect(gw) for _ in range(3)]
    for s in held:  # each is accepted and served: it holds a slot
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 200
    with connect(gw) as extra:
        status, body = read_response(extra)
    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    for s in held:
        s.close()
    # Slots free up as soon as connections close: other clients are served again.
    deadline = time.monotonic() + 5
    while True:
        try:
            answer = client_for(gw).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            break
        except Exception:
            assert time.monotonic() < deadline, "the gateway stayed full after its clients left"
            time.sleep(0.2)
    assert answer.choices[0].message.content.startswith("Hello from alpha")


def test_admin_endpoints_move_off_the_client_port(stack):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    admin_port = probe.getsockname()[1]
    probe.close()
    gw, _ = stack(["alpha"], gateway_args=("--admin-listen", f"127.0.0.1:{admin_port}"))
    # Clients see neither the routes and providers nor the metrics ...
    assert http("GET", f"{gw.url}/status")[0] == 404
    assert http("GET", f"{gw.url}/metrics")[0] == 404
    assert http("GET", f"{gw.url}/readyz")[0] == 200
    # ... which the admin port serves.
    status, _, body = http("GET", f"http://127.0.0.1:{admin_port}/status")
    assert status == 200 and "gpt-4o" in json.loads(body)["routes"]
    assert http("GET", f"http://127.0.0.1:{admin_port}/metrics")[0] == 200
    assert http("GET", f"http://127.0.0.1:{admin_port}/v1/models")[0] == 404
