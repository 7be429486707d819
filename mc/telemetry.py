"""Per-phase timing of the MegaContext step, mirrored as OpenTelemetry spans when asked for.

`PhaseTimer.phase(name)` times a block (synchronising CUDA so GPU work is counted where it
happens) and accumulates seconds per phase name. When $MC_OTEL_ENDPOINT is set (an OTLP/HTTP
traces endpoint, e.g. http://localhost:4318/v1/traces) each phase is also exported as a span;
otherwise the tracer is a no-op and costs nothing.
"""

import contextlib
import os
import time
from collections import defaultdict

import torch

_tracer = None


def get_tracer():
    """The process-wide tracer: OTLP-exporting when $MC_OTEL_ENDPOINT is set, else None."""
    global _tracer
    endpoint = os.environ.get("MC_OTEL_ENDPOINT")
    if _tracer is None and endpoint:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        provider = TracerProvider(resource=Resource.create({"service.name": "megacontext"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        _tracer = provider.get_tracer("megacontext")
    return _tracer


class PhaseTimer:
    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        tracer = get_tracer()
        span = tracer.start_as_current_span(f"mc.{name}") if tracer else contextlib.nullcontext()
        with span:
            self._sync()
            t0 = time.perf_counter()
            yield
            self._sync()
            self.seconds[name] += time.perf_counter() - t0

    def pop(self) -> dict:
        """Seconds per phase since the last pop."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out
