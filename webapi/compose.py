"""Serving several apps from one listener, chosen by path prefix, each seeing the full path.

`PrefixDispatch` renders the first resource whose prefix the request path starts with (a
prefix ending in "/" matches that directory, one without matches the exact path or what is
under it), else the default. Klein apps keep their absolute route paths this way. This module
must never look at anything but the path, and never touch the request body.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

__all__ = ["PrefixDispatch"]


class PrefixDispatch(Resource):
    isLeaf = True

    def __init__(self, routes: list[tuple[bytes, IResource]], default: IResource) -> None:
        super().__init__()
        self._routes = routes
        self._default = default

    def choose(self, path: bytes) -> IResource:
        for prefix, resource in self._routes:
            if path == prefix.rstrip(b"/") or path.startswith(prefix.rstrip(b"/") + b"/"):
                return resource
        return self._default

    def render(self, request: IRequest) -> bytes | int:  # type: ignore[override]
        chosen: Resource = self.choose(request.path)  # type: ignore[assignment]
        return chosen.render(request)  # type: ignore[no-any-return]
