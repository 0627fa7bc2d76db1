"""When request spans are off, decided once: OpenTelemetry not installed, or the API's default provider."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ai_query._tracing import request_tracer


def test_without_opentelemetry_there_is_no_tracer():
    # a fresh interpreter in which the package cannot be imported (as when it is not installed)
    code = "import sys; sys.modules['opentelemetry'] = None\nfrom ai_query._tracing import request_tracer\nprint(request_tracer())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr


def test_the_apis_default_providers_give_no_tracer_and_a_real_one_does():
    trace = pytest.importorskip("opentelemetry.trace")
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # nothing configured in this process
    assert request_tracer() is None and request_tracer(None) is None
    assert request_tracer(trace.NoOpTracerProvider()) is None  # passed explicitly, still nothing to record
    assert request_tracer(sdk.TracerProvider()) is not None
