"""OpenTelemetry traces of training: one trace per optimizer step, a child span per phase.

Tracing is on when an OTLP/HTTP endpoint is configured, by the standard variables
($OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or $OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces) or by
$MC_OTEL_ENDPOINT (a full traces URL, e.g. http://localhost:4318/v1/traces); the service name is
$OTEL_SERVICE_NAME (default megacontext). Otherwise `span` is a no-op that costs nothing.
Tests (or a user with another backend) pass their own exporter to `configure`.
"""

import contextlib
import os

SERVICE_NAME = "megacontext"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "MC_OTEL_ENDPOINT")

_provider = None
_tracer = None
_configured = False


class SystemRandomIds:
    """Trace and span ids from the OS's randomness: OpenTelemetry's default draws them from Python's `random`,
    which training seeds, so every run of a script would reuse the same trace ids."""

    def generate_span_id(self) -> int:
        return int.from_bytes(os.urandom(8), "big") or 1

    def generate_trace_id(self) -> int:
        return int.from_bytes(os.urandom(16), "big") or 1

    def is_trace_id_random(self) -> bool:  # W3C "random" trace flag
        return True


def configure(exporter=None):
    """Install the process's tracer: spans go to exporter (exported as each span ends), or by default to
    the OTLP endpoint of the environment (in batches); returns the tracer, or None when tracing is off."""
    global _provider, _tracer, _configured
    shutdown()
    _configured = True
    if exporter is None and not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        standard = any(os.environ.get(name) for name in ENDPOINT_VARIABLES[:2])
        # the exporter reads the standard variables itself; MC_OTEL_ENDPOINT is passed as the full URL
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=None if standard else os.environ["MC_OTEL_ENDPOINT"]))
    else:
        processor = SimpleSpanProcessor(exporter)
    service = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
    _provider = TracerProvider(resource=Resource.create({"service.name": service}), id_generator=SystemRandomIds())
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("megacontext")
    return _tracer


def tracer():
    """The process's tracer (configured from the environment on first use), or None when tracing is off."""
    return _tracer if _configured else configure()


@contextlib.contextmanager
def span(name: str, **attributes):
    """A span named name with attributes, the child of the current span (a new trace when there is none)."""
    active = tracer()
    if active is None:
        yield None
        return
    with active.start_as_current_span(name, attributes=attributes) as current:
        yield current


def shutdown():
    """Export what is buffered and stop tracing (the environment is read again on next use)."""
    global _provider, _tracer, _configured
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer, _configured = None, None, False
