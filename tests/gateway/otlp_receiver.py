"""An OTLP/HTTP trace receiver on loopback. Each export is decoded with OpenTelemetry's
own protobuf definitions (opentelemetry-proto), the way a collector reads it; the spans
are kept for the tests to inspect."""

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {v: k.removeprefix("SPAN_KIND_").lower() for k, v in trace_pb2.Span.SpanKind.items()}


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class Span:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict
    status: str
    resource: dict = field(default_factory=dict)


class OtlpReceiver:
    def __init__(self, port=0, on_spans=None):
        self.spans = []
        self._on_spans = on_spans
        self.content_types = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request, self.headers.get("content-type"))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _add(self, request, content_type):
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(
                        name=s.name,
                        kind=KINDS.get(s.kind, str(s.kind)),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status=trace_pb2.Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_").lower(),
                        resource=resource,
                    ))
        with self._lock:
            self.spans.extend(spans)
            self.content_types.append(content_type)
            if self._on_spans:
                self._on_spans(spans)

    def wait_for(self, count, trace_id=None, until=None, timeout=15):
        """The spans (of `trace_id`, if given) once at least `count` have arrived and
        `until(spans)` holds, or whatever arrived within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                got = [s for s in self.spans if trace_id is None or s.trace_id == trace_id]
            if (len(got) >= count and (until is None or until(got))) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def stop(self):
        self._server.shutdown()
        self._server.server_close()



if __name__ == "__main__":
    # python otlp_receiver.py PORT SPANS.jsonl: receive on 127.0.0.1:PORT and append every
    # span to SPANS.jsonl, one JSON object per line (for tests written in other languages).
    import dataclasses
    import json
    import sys

    port, out = int(sys.argv[1]), sys.argv[2]

    def write(spans):
        with open(out, "a") as f:
            for span in spans:
                f.write(json.dumps(dataclasses.asdict(span)) + "\n")

    receiver = OtlpReceiver(port, on_spans=write)
    print(f"otlp-receiver listening on {receiver.url}", flush=True)
    threading.Event().wait()
