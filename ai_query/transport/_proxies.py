"""Which proxy a request goes through: the standard variables, loopback exempt.

``HTTPS_PROXY`` / ``HTTP_PROXY`` (either case) name the proxy for ``https://`` / ``http://``
URLs and ``NO_PROXY`` the hosts that go direct, as curl and Python's ``urllib`` read them. A
loopback host (``localhost``, ``127.0.0.0/8``, ``::1``) always goes direct when the proxy comes
from the environment: the quota broker, health checks and local model servers live there, and
a site-wide proxy cannot reach them. A proxy given to the transport itself (``proxy=``) is
meant, so it applies to loopback hosts too (``NO_PROXY`` still exempts). ``https://`` targets
go through a ``CONNECT`` tunnel; ``http://`` ones are sent to the proxy in absolute form.
"""

from __future__ import annotations

import ipaddress
import urllib.request
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def proxy_for(url: str, configured: str | None = None) -> str | None:
    """The proxy URL for ``url`` (``None``: go direct); read from the environment unless ``configured``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if urllib.request.proxy_bypass_environment(netloc):
        return None
    if configured is not None:
        return configured or None
    if is_loopback(host):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme) or None
