"""A transport that answers from a function: the seam unit tests use instead of a network.

``MockTransport(handler)``: ``handler(request)`` returns a ``Response`` (or awaits to one) or
raises one of the core's ``TransportError``s, exactly what a real transport would do; the code
under test is the shipped client, nothing patched::

    def handler(request: Request) -> Response:
        return Response(200, content=b'{"choices": []}')

    client = AIQueryClient(registry, transport=MockTransport(handler))
"""

from __future__ import annotations

import inspect
from typing import Awaitable, Callable, Union

from ._messages import Request, Response

Handler = Callable[[Request], Union[Response, Awaitable[Response]]]


class MockTransport:
    """Answers every request with ``handler(request)``, sync or async; records nothing itself."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.closed = False

    async def send(self, request: Request) -> Response:
        response = self.handler(request)
        if inspect.isawaitable(response):
            response = await response
        if not isinstance(response, Response):
            raise TypeError(f"the mock handler returned {type(response).__name__}, not a transport Response")
        response.headers = {k.lower(): v for k, v in response.headers.items()}
        return response

    async def aclose(self) -> None:
        self.closed = True
