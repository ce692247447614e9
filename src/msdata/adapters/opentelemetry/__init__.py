"""OpenTelemetry for msdata: spans, trace context in message headers, metrics
(``pip install "msdata[otel]"``).

::

    from msdata import telemetry
    from msdata.adapters.opentelemetry import OpenTelemetry

    otel = OpenTelemetry()                   # the global tracer and meter providers
    telemetry.install(otel)

See docs/observability.md for the spans, attributes and metrics it makes.
"""

try:
    import opentelemetry.trace  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    from msdata.errors import MissingDependencyError

    raise MissingDependencyError("opentelemetry", "otel") from e

from msdata.adapters.opentelemetry.tracing import OpenTelemetry

__all__ = ["OpenTelemetry"]
