"""Faults and directives: the failures the provider simulator injects, per request or per prompt.

**Faults** (``error_rates``, one seeded draw per admitted request, so the i-th admitted request
gets the same fault for the same seed): ``"500"``; ``"503"`` (overloaded: 503, Anthropic 529);
``"reset"`` (the TCP connection is aborted with an RST, no response); ``"malformed"`` (200 with a
truncated JSON body, or a truncated SSE frame); ``"timeout"`` (the answer is held ``hang_s`` longer,
then sent normally if the client is still there). Faults come after the latency.

**Directives** in a prompt inject failures per row, without patching the client:

- ``[[status:500]]`` (any status): always answer that status;
- ``[[flaky:N]]``: answer 503 (Anthropic 529) the first N times this exact prompt is seen;
- ``[[ratelimit:N]]``: answer 429 with ``Retry-After: 0`` the first N times;
- ``[[malformed:N]]``: answer 200 with a broken JSON body the first N times;
- ``[[reset:N]]``: abort the connection the first N times;
- ``[[delay:S]]``: add S seconds of latency, every time;
- ``[[reply:TEXT]]``: answer TEXT (``\\n`` allowed) instead of the default echo.
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
import struct
from collections import Counter
from typing import Any, Mapping, NoReturn

from aiohttp import web

DIRECTIVE = re.compile(r"\[\[(status|flaky|ratelimit|malformed|reset|delay|reply):(.*?)\]\]", re.S)

FAULT_KINDS = ("500", "503", "reset", "malformed", "timeout")
"""The kinds ``error_rates`` accepts, in the order a draw tests them."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def fault_table(error_rates: Mapping[Any, float] | None) -> tuple[tuple[float, str], ...]:
    """Cumulative thresholds, so one uniform draw picks at most one fault."""
    rates = {str(kind): rate for kind, rate in (error_rates or {}).items()}
    unknown = sorted(set(rates) - set(FAULT_KINDS))
    _check(not unknown, f"error_rates has unknown kinds {unknown}; use {list(FAULT_KINDS)}, e.g. error_rates={{'500': 0.05, 'reset': 0.02}}")
    for kind, rate in rates.items():
        _check(_is_number(rate) and 0 <= rate <= 1, f"error_rates[{kind!r}]={rate!r} must be a share between 0 and 1")
    total = sum(rates.values())
    _check(total <= 1 + 1e-9, f"error_rates add up to {total:g}; their sum must be at most 1")
    table, cumulative = [], 0.0
    for kind in FAULT_KINDS:
        if rates.get(kind):
            cumulative += rates[kind]
            table.append((cumulative, kind))
    return tuple(table)


def directives(key: str, seen_counts: Counter) -> tuple[tuple[str, int] | None, str | None, float]:
    """The prompt's directives: (failure to inject, reply text, extra delay)."""
    seen_counts[key] += 1
    seen = seen_counts[key]
    reply, extra = None, 0.0
    for kind, arg in DIRECTIVE.findall(key):
        if kind == "reply":
            reply = arg.replace("\\n", "\n")
            continue
        try:
            value = float(arg) if kind == "delay" else int(arg)
        except ValueError:
            raise ValueError(f"directive [[{kind}:{arg}]] needs a number") from None
        if kind == "delay":
            extra += value
        elif kind == "status" and not 200 <= value <= 599:
            raise ValueError(f"directive [[status:{arg}]] needs an HTTP status between 200 and 599")
        elif kind == "status" or seen <= value:
            return (kind, int(value)), reply, extra
    return None, reply, extra


def abort(request: web.Request) -> NoReturn:
    """Drop the connection with a TCP RST and no response (a ``reset`` fault)."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
        transport.abort()
    raise asyncio.CancelledError  # aiohttp writes nothing for a cancelled handler
