"""The endpoint registry: endpoints by name, loaded from the built-ins, ``AIQ_ENDPOINTS`` and files.

An endpoints file holds one endpoint object, a list of them, or ``{"endpoints": [...]}``, optionally
with a top-level ``prices`` table (``{model: pricing}``) that fills entities without their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .._errors import ConfigError, UnknownEndpointError
from ._checks import mapping
from ._endpoint import EndpointConfig
from ._entities import Pricing


def _endpoint_list(data: Any, source: str) -> list[Any]:
    if isinstance(data, Mapping) and "endpoints" in data:
        unknown = sorted(set(data) - {"endpoints", "prices"})
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; allowed are endpoints, prices")
        data = data["endpoints"]
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected an endpoint object, a list of them, or {{\"endpoints\": [...]}}")
    return data


class EndpointRegistry:
    """Endpoints by name. Later definitions replace earlier ones of the same name."""

    def __init__(self, endpoints: Iterable[EndpointConfig] = ()) -> None:
        self._endpoints: dict[str, EndpointConfig] = {}
        for endpoint in endpoints:
            self._endpoints[endpoint.name] = endpoint

    def get(self, name: str) -> EndpointConfig:
        """The endpoint called ``name``; an ``UnknownEndpointError`` lists the known ones."""
        try:
            return self._endpoints[name]
        except KeyError:
            raise UnknownEndpointError(name, list(self._endpoints)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._endpoints

    def __iter__(self):
        return iter(self._endpoints.values())

    def __len__(self) -> int:
        return len(self._endpoints)

    def names(self) -> list[str]:
        return sorted(self._endpoints)

    def with_endpoints(self, endpoints: Iterable[EndpointConfig]) -> "EndpointRegistry":
        """A new registry with ``endpoints`` added (replacing same-named ones)."""
        return EndpointRegistry([*self._endpoints.values(), *endpoints])

    @classmethod
    def from_data(cls, data: Any, source: str = "endpoints") -> "EndpointRegistry":
        """Endpoints from parsed JSON; a top-level ``prices`` table ({model: pricing}) fills entities without one."""
        prices: dict[str, Pricing] = {}
        if isinstance(data, Mapping) and "prices" in data:
            table = mapping(data["prices"], f"{source}.prices")
            prices = {model: Pricing.from_dict(p, f"{source}.prices[{model!r}]") for model, p in table.items()}
        items = _endpoint_list(data, source)
        endpoints = [EndpointConfig.from_dict(item, f"{source}[{i}]") for i, item in enumerate(items)]
        if prices:
            endpoints = [
                ep.replace(served_entities=tuple(
                    e if e.pricing is not None or e.model_name not in prices else e.replace(pricing=prices[e.model_name])
                    for e in ep.served_entities))
                for ep in endpoints
            ]
        return cls(endpoints)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "EndpointRegistry":
        """Load an endpoints JSON file (one endpoint, a list, or ``{"endpoints": [...]}``)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read endpoints file {p}: {exc.strerror}; check the path") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"endpoints file {p} is not valid JSON: {exc}") from exc
        return cls.from_data(data, str(p))

    @classmethod
    def builtin(cls) -> "EndpointRegistry":
        """The embedded defaults (``local-chat``, ``local-embed``, ...): ordinary registry entries."""
        text = (Path(__file__).parent.parent / "builtin_endpoints.json").read_text()
        return cls.from_data(json.loads(text), "builtin_endpoints.json")

    @classmethod
    def default(cls, extra: str | os.PathLike[str] | None = None) -> "EndpointRegistry":
        """Built-ins, then the file named by ``AIQ_ENDPOINTS``, then ``extra``."""
        registry = cls.builtin()
        for source in (os.environ.get("AIQ_ENDPOINTS"), extra):
            if source:
                registry = registry.with_endpoints(cls.from_file(source))
        return registry
