"""Fixtures for the gateway tier: real gateway and fake-provider processes on loopback,
driven by the official openai SDK."""

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGETS = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
TARGET = TARGETS / "debug"
PROVIDER_KEY = "sk-provider-7c1f9e2d-never-log-me"
CLIENT_KEY = "client-key-3b8a51-never-log-me"
INTERN_KEY = "intern-key-90d2c4-never-log-me"


@pytest.fixture(scope="session", autouse=True)
def built():
    subprocess.run(
        ["cargo", "build", "-q", "-p", "switchyard-gateway", "-p", "fake-provider"],
        cwd=REPO,
        check=True,
    )


def _start(cmd, log_path, preexec_fn=None, env=None):
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=preexec_fn,
                            env=None if env is None else {**os.environ, **env})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{cmd[0]} exited early; see {log_path}")
        if " listening on " in line:
            return proc, line.strip().split(" listening on ")[1]
    raise RuntimeError(f"{cmd[0]} did not start; see {log_path}")


def http(method, url, body=None, headers=None, timeout=10):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class FakeProvider:
    def __init__(self, name, tmp_path, tls=False):
        self.name = name
        cmd = [str(TARGET / "fake-provider"), "--listen", "127.0.0.1:0", "--name", name]
        self.ca = None
        if tls:
            self.ca = tmp_path / f"tls-{name}" / "ca.pem"
            cmd += ["--tls-dir", str(self.ca.parent)]
        self.proc, self.url = _start(cmd, tmp_path / f"fake-{name}.log")

    def _admin(self, method, path, body=None):
        if self.ca is None:
            return http(method, f"{self.url}{path}", body)
        import ssl
        ctx = ssl.create_default_context(cafile=str(self.ca))
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, dict(resp.headers), resp.read()

    def fault(self, spec, model=None, times=None):
        body = {"fault": spec}
        if model:
            body["model"] = model
        if times:
            body["times"] = times
        status, _, _ = self._admin("POST", "/admin/faults", body)
        assert status == 200

    def clear(self):
        self._admin("DELETE", "/admin/faults")

    def attempts(self):
        _, _, body = self._admin("GET", "/admin/attempts")
        return json.loads(body)

    def client_tries(self):
        """The requests made for clients: every attempt but the gateway's own checks (model
        lists, and the one-token completions of recovery checks)."""
        return [a for a in self.attempts()
                if a["method"] == "POST" and a["headers"]["x-request-id"] != "switchyard-recovery-check"]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Gateway:
    def __init__(self, manifests_dir, tmp_path, region="us-east", extra_args=(), binary=None, preexec_fn=None,
                 env=None):
        self.log_path = tmp_path / "gateway.log"
        self.manifests_dir = manifests_dir
        self.proc, self.url = _start(
            [str(binary or TARGET / "switchyard-gateway"), "--manifests", str(manifests_dir), "--region", region,
             "--listen", "127.0.0.1:0", "--drain-seconds", "10", *extra_args],
            self.log_path,
            preexec_fn,
            env,
        )

    def status(self):
        _, _, body = http("GET", f"{self.url}/status")
        return json.loads(body)

    def output(self):
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stream_text(client, **kw):
    """A streamed chat completion read to its end: the text, the usage its chunks reported
    (or None), and the set of models its chunks named."""
    text, usage, models = "", None, set()
    messages = [{"role": "user", "content": "hello"}]
    for chunk in client.chat.completions.create(model="gpt-4o", messages=messages, stream=True, **kw):
        models.add(chunk.model)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
    return text, usage, models


def provider(name, url, type_="openaiCompatible", region="us-east", models=("gpt-4o",), **extra):
    p = {"name": name, "type": type_, "endpoint": url, "region": region,
         "credentials": {"secretRef": {"name": "provider-keys"}},
         "models": [m if isinstance(m, dict) else {"name": m} for m in models]}
    if type_ == "azureOpenAI":
        p["azure"] = {"apiVersion": "2024-10-21"}
        p["models"] = [{"name": m, "deployment": m.replace(".", "")} for m in models]
    p.update(extra)
    return p


def manifests(providers, routes, **policy):
    """The documents a user would kubectl apply, as JSON (which is YAML)."""
    docs = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "provider-keys"}, "stringData": {"apiKey": PROVIDER_KEY}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "client-keys"}, "stringData": {"app": CLIENT_KEY, "intern": INTERN_KEY}},
        {"apiVersion": "switchyard.dev/v1alpha1", "kind": "ProviderPool", "metadata": {"name": "chat"},
         "spec": {"regions": [{"name": "us-east"}, {"name": "eu-west"}], "providers": providers}},
        {"apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "chat"},
         "spec": {"poolRef": {"name": "chat"}, "clientAuth": {"secretRef": {"name": "client-keys"}}, "routes": routes, **policy}},
    ]
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


@pytest.fixture
def stack(tmp_path):
    """Starts fake providers and a gateway: stack(["alpha", "beta"], routes=..., **policy)."""
    started = []

    def make(names, routes=None, policy=None, provider_extra=None, region="us-east", tls=(), gateway_args=(),
             gateway_binary=None, gateway_preexec=None, gateway_env=None):
        fakes = {n: FakeProvider(n, tmp_path, tls=n in tls) for n in names}
        started.extend(fakes.values())
        extra = provider_extra or {}
        providers = [provider(n, f.url, **extra.get(n, {})) for n, f in fakes.items()]
        if routes is None:
            routes = [{"model": "gpt-4o", "strategy": "roundRobin", "targets": [{"provider": n} for n in names]}]
        mdir = tmp_path / "manifests"
        mdir.mkdir(exist_ok=True)
        (mdir / "switchyard.yaml").write_text(manifests(providers, routes, **(policy or {})))
        gw = Gateway(mdir, tmp_path, region=region, extra_args=gateway_args, binary=gateway_binary,
                     preexec_fn=gateway_preexec, env=gateway_env)
        started.append(gw)
        return gw, fakes

    yield make
    for p in reversed(started):
        p.stop()


@pytest.fixture
def client_for():
    import openai

    def make(gw, key=CLIENT_KEY, timeout=30):
        return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=timeout)

    return make
