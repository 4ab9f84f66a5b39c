"""The abuse tier: the release gateway, on loopback, against hostile clients and hostile
upstreams. Each test drives one attack with bounded loops and asserts the bound a
platform team relies on: how long it lasts, the peak resident memory, the status code
the attacker gets, and that other clients are still served meanwhile."""

import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest

from conftest import CLIENT_KEY, REPO, TARGETS, http

RELEASE = TARGETS / "release" / "switchyard-gateway"
MSG = [{"role": "user", "content": "hello"}]
FULL = "Hello from beta. The quick brown fox jumps over the lazy dog."
TIERED = [{"model": "gpt-4o", "targets": [{"provider": "alpha"}, {"provider": "beta", "priority": 1}]}]
MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def release_gateway():
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "switchyard-gateway"], cwd=REPO, check=True)


@pytest.fixture
def release_stack(stack):
    def make(names, **kw):
        return stack(names, gateway_binary=RELEASE, **kw)

    return make


def memory(proc):
    """(resident now, peak resident) of a process, in bytes."""
    fields = {}
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["VmRSS"][0]) * 1024, int(fields["VmHWM"][0]) * 1024


def cpu_seconds(proc):
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def address(gw):
    host, port = gw.url.removeprefix("http://").split(":")
    return host, int(port)


def served_quickly(gw, n=5, bound=1.0):
    """A well-behaved client's slowest answer out of `n`, asserting each is complete."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)
    slowest = 0.0
    for _ in range(n):
        start = time.monotonic()
        answer = client.chat.completions.create(model="gpt-4o", messages=MSG)
        slowest = max(slowest, time.monotonic() - start)
        assert answer.choices[0].message.content.startswith("Hello from")
    assert slowest < bound, f"a normal client waited {slowest:.2f}s"
    return slowest


def served_again_within(gw, seconds, why):
    """Waits until a normal client is served quickly again, at most `seconds`. An answer
    that is slow (a connection queued while its serving thread was still backing off
    from failed accepts) means not yet recovered, as an error does."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            served_quickly(gw, n=3)
            return
        except (openai.APIError, AssertionError) as e:
            assert time.monotonic() < deadline, f"{why}: {e}"
            time.sleep(0.2)


def read_status(sock, timeout=5):
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_slowloris_connections_are_closed_at_the_header_timeout_while_others_are_served(release_stack):
    gw, _ = release_stack(["alpha"], gateway_args=("--header-timeout-seconds", "2"))
    conns = []
    for _ in range(200):
        s = socket.create_connection(address(gw), timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        conns.append(s)
    start = time.monotonic()
    served_quickly(gw, n=10, bound=0.5)
    # Trickling a header byte every half second keeps none of them open past the timeout.
    open_ = set(range(len(conns)))
    while open_ and time.monotonic() - start < 6:
        for i in list(open_):
            try:
                conns[i].sendall(b"X")
                conns[i].settimeout(0.01)
                if conns[i].recv(4096) == b"":
                    open_.discard(i)
            except socket.timeout:
                pass
            except OSError:
                open_.discard(i)
        time.sleep(0.5)
    took = time.monotonic() - start
    for s in conns:
        s.close()
    assert not open_, f"{len(open_)} slowloris connections still open after {took:.1f}s"
    assert took < 4, f"the last slowloris connection was closed after {took:.1f}s (timeout 2s)"
    _, peak = memory(gw.proc)
    print(f"slowloris: last closed after {took:.2f}s, peak RSS {peak / MIB:.1f} MiB")
    assert peak < 64 * MIB, f"peak resident memory {peak / MIB:.0f} MiB"


def test_a_connection_flood_meets_a_clear_refusal_at_the_cap(release_stack):
    gw, _ = release_stack(["alpha"], gateway_args=("--max-connections", "100"))
    held = [socket.create_connection(address(gw), timeout=10) for _ in range(100)]
    # Every held connection has been accepted once it answers; this also fills the cap.
    for s in held:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_status(s)[0] == 200
    start = time.monotonic()
    refused = []
    for _ in range(100):
        with socket.create_connection(address(gw), timeout=10) as s:
            status, body = read_status(s)
            refused.append((status, body))
    took = time.monotonic() - start
    assert all(status == 503 for status, _ in refused), {s for s, _ in refused}
    assert all(json.loads(body)["error"]["code"] == "too_many_connections" for _, body in refused)
    assert took < 3, f"100 refusals took {took:.1f}s"
    for s in held:
        s.close()
    served_again_within(gw, 5, "the gateway stayed full after the flood left")


def test_at_the_file_descriptor_limit_the_gateway_neither_spins_nor_stays_down(release_stack):
    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    gw, _ = release_stack(["alpha"], gateway_preexec=low_fd_limit)
    # The kernel completes these handshakes; the gateway runs out of descriptors to
    # accept them with.
    conns = [socket.create_connection(address(gw), timeout=10) for _ in range(150)]
    time.sleep(1)
    before = cpu_seconds(gw.proc)
    time.sleep(3)
    spent = cpu_seconds(gw.proc) - before
    print(f"fd exhaustion: {spent:.2f}s CPU in 3s")
    assert spent < 0.5, f"the gateway used {spent:.2f}s of CPU in 3s while out of descriptors"
    assert "accepting a connection failed" in gw.output()
    for s in conns:
        s.close()
    served_again_within(gw, 10, "the gateway did not recover once descriptors were free")


def send_large_body(gw, key, size, results, i):
    """Declares and sends `size` bytes of JSON; records the status (None: no answer)."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + (f"Authorization: Bearer {key}\r\n".encode() if key else b"")
        + f"Content-Length: {size}\r\n\r\n".encode()
    )
    prefix = b'{"model":"gpt-4o","messages":[{"role":"user","content":"'
    suffix = b'"}]}'
    piece = b"a" * MIB
    try:
        with socket.create_connection(address(gw), timeout=20) as s:
            s.sendall(head + prefix)
            left = size - len(prefix) - len(suffix)
            try:
                while left > 0:
                    n = min(left, len(piece))
                    s.sendall(piece[:n])
                    left -= n
                s.sendall(suffix)
            except OSError:
                pass  # refused before the body was read: the answer is waiting
            results[i] = read_status(s, timeout=20)
    except OSError as e:
        results[i] = (None, str(e).encode())


def run_clients(n, target, *args):
    results = [None] * n
    threads = [threading.Thread(target=target, args=(*args, results, i)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_keyless_clients_with_large_bodies_cost_no_memory(release_stack):
    gw, _ = release_stack(["alpha"])
    start = time.monotonic()
    results = run_clients(48, send_large_body, gw, None, 15 * MIB)
    took = time.monotonic() - start
    assert [r[0] for r in results] == [401] * 48, [r[0] for r in results]
    _, peak = memory(gw.proc)
    print(f"keyless bodies: peak RSS {peak / MIB:.1f} MiB, {took:.2f}s")
    assert peak < 64 * MIB, f"48 keyless 15 MiB bodies took the gateway to {peak / MIB:.0f} MiB"
    assert took < 20
    served_quickly(gw)


def test_keyed_large_bodies_share_one_memory_budget(release_stack):
    budget = 64 * MIB
    gw, _ = release_stack(["alpha"], gateway_args=("--memory-budget-bytes", str(budget)))
    results = run_clients(24, send_large_body, gw, CLIENT_KEY, 15 * MIB)
    statuses = [r[0] for r in results]
    refused = [r for r in results if r[0] == 503]
    # A body counts twice (as received, and as sent upstream): two 15 MiB bodies fit in
    # 64 MiB at once; the rest are refused, not queued.
    assert statuses.count(200) >= 2, statuses
    assert len(refused) + statuses.count(200) == 24, statuses
    assert refused, "24 bodies of 15 MiB at once all fitted in a 64 MiB budget"
    assert all(b'"memory_budget_exhausted"' in body for _, body in refused)
    _, peak = memory(gw.proc)
    print(f"keyed bodies: {statuses.count(200)} served, {len(refused)} refused, peak RSS {peak / MIB:.1f} MiB")
    assert peak < budget + 80 * MIB, f"peak resident memory {peak / MIB:.0f} MiB with a {budget // MIB} MiB budget"
    served_quickly(gw)


def test_concurrent_oversized_answers_are_bounded_by_the_memory_budget(release_stack):
    budget = 128 * MIB
    gw, fakes = release_stack(["alpha"], gateway_args=("--memory-budget-bytes", str(budget)))
    rss_before, _ = memory(gw.proc)
    fakes["alpha"].fault("huge:60000000", times=20)

    def ask(gw, results, i):
        status, _, body = http("POST", f"{gw.url}/v1/chat/completions", {"model": "gpt-4o", "messages": MSG},
                               headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
                               timeout=60)
        results[i] = (status, len(body), body[:300])

    results = run_clients(20, ask, gw)
    statuses = [r[0] for r in results]
    assert 1 <= statuses.count(200) <= 2, statuses
    assert statuses.count(503) == 20 - statuses.count(200), statuses
    assert all(b"memory_budget_exhausted" in r[2] for r in results if r[0] == 503)
    assert all(r[1] > 60_000_000 for r in results if r[0] == 200), "the answers that fit arrive whole"
    rss_after, peak = memory(gw.proc)
    print(f"oversized answers: {statuses.count(200)} served, peak RSS {peak / MIB:.1f} MiB, "
          f"RSS {rss_before / MIB:.1f} -> {rss_after / MIB:.1f} MiB")
    assert peak < budget + 80 * MIB, f"peak resident memory {peak / MIB:.0f} MiB with a {budget // MIB} MiB budget"
    # Large buffers go back to the system once answered.
    assert rss_after < rss_before + 32 * MIB, f"{(rss_after - rss_before) / MIB:.0f} MiB stayed resident"
    served_quickly(gw)


STREAM_LIMITS = {"timeouts": {"connect": "500ms", "firstByte": "2s", "streamIdle": "2s", "total": "4s"}}


def test_a_stream_of_only_comments_fails_over_at_the_first_byte_timeout(release_stack, client_for):
    gw, fakes = release_stack(["alpha", "beta"], routes=TIERED, policy=STREAM_LIMITS)
    fakes["alpha"].fault("comments:200")
    start = time.monotonic()
    text = ""
    for chunk in client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
    took = time.monotonic() - start
    assert text == FULL
    assert 1.8 < took < 3, f"the comment-only stream held the request for {took:.1f}s (firstByte 2s)"


def test_a_lone_stream_of_only_comments_ends_in_a_clear_error_in_time(release_stack, client_for):
    gw, fakes = release_stack(["alpha"], policy=STREAM_LIMITS)
    fakes["alpha"].fault("comments:200")
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
    took = time.monotonic() - start
    assert err.value.status_code == 503
    assert "no token within the first-byte timeout" in str(err.value)
    assert took < 3, f"{took:.1f}s"


def collect_stream(gw):
    """(text received, the error event's body or None, seconds until the stream ended)."""
    text, error = "", None
    start = time.monotonic()
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)
    try:
        for chunk in client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            for choice in chunk.choices:
                text += choice.delta.content or ""
    except openai.APIError as e:
        error = e
    return text, error, time.monotonic() - start


def test_comments_mid_stream_do_not_hold_off_the_idle_timeout(release_stack):
    gw, fakes = release_stack(["alpha"], policy=STREAM_LIMITS | {"timeouts": {**STREAM_LIMITS["timeouts"], "total": "30s"}})
    fakes["alpha"].fault("comments-after:3")
    text, error, took = collect_stream(gw)
    assert text and not text.endswith("dog."), text
    assert error is not None and "no token for 2s" in str(error) and "incomplete" in str(error), error
    assert took < 3.5, f"comments kept a stalled stream open for {took:.1f}s (streamIdle 2s)"


def test_a_slow_stream_ends_at_the_total_timeout(release_stack):
    gw, fakes = release_stack(["alpha"], policy=STREAM_LIMITS)
    fakes["alpha"].fault("slow:500")
    text, error, took = collect_stream(gw)
    assert text and not text.endswith("dog."), text
    assert error is not None and "total timeout (4s)" in str(error), error
    assert 3.8 < took < 5, f"a slow stream ran {took:.1f}s against a 4s total"


def test_streams_running_at_the_drain_deadline_end_with_an_interruption_event(release_stack):
    gw, fakes = release_stack(["alpha"], policy={"timeouts": {"total": "60s", "streamIdle": "10s"}},
                              gateway_args=("--drain-seconds", "2", "--shutdown-delay-seconds", "0"))
    fakes["alpha"].fault("slow:400")
    results = {}

    def run():
        results["stream"] = collect_stream(gw)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1)
    gw.proc.send_signal(signal.SIGTERM)
    t.join(10)
    text, error, took = results["stream"]
    assert text and not text.endswith("dog."), text
    assert error is not None and "shutting down" in str(error) and "incomplete" in str(error), error
    assert gw.proc.wait(5) == 0


def test_idempotency_with_long_keys_stays_within_its_memory_bound(release_stack):
    from http.client import HTTPConnection

    bound = 4 * MIB
    gw, _ = release_stack(["alpha"], gateway_args=("--idempotency-max-bytes", str(bound)))
    body = json.dumps({"model": "gpt-4o", "messages": MSG})
    conn = HTTPConnection(*address(gw), timeout=10)

    def send(i):
        conn.request("POST", "/v1/chat/completions", body, {
            "Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json",
            "Idempotency-Key": f"{i:0>255}"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200

    for i in range(500):  # warm up: pools, caches, allocator arenas
        send(i)
    rss_before, _ = memory(gw.proc)
    start = time.monotonic()
    for i in range(500, 12_500):
        send(i)
        assert time.monotonic() - start < 60
    rss_after, _ = memory(gw.proc)
    held = gw.status()["idempotency"]["bytesHeld"]
    assert held <= bound, held
    grew = rss_after - rss_before
    print(f"idempotency: {held} bytes reported, RSS grew {grew / MIB:.1f} MiB")
    assert grew < bound + 8 * MIB, f"memory grew {grew / MIB:.1f} MiB with a {bound // MIB} MiB replay bound"


def test_idle_upstream_connections_are_closed(release_stack, client_for):
    gw, fakes = release_stack(["alpha"], gateway_args=("--upstream-idle-timeout-seconds", "1"))
    for _ in range(3):
        client_for(gw).chat.completions.create(model="gpt-4o", messages=MSG)

    def open_connections():
        # The admin request's own connection is one of them.
        return json.loads(fakes["alpha"]._admin("GET", "/admin/connections")[2])["open"] - 1

    assert open_connections() >= 1, "the gateway keeps its upstream connection for reuse"
    deadline = time.monotonic() + 5
    while open_connections() > 0:
        assert time.monotonic() < deadline, "an idle upstream connection stayed open past its timeout"
        time.sleep(0.2)
