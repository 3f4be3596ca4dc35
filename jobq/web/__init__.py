"""The web layer (the ``jobq[web]`` extra): the HTTP API as an ASGI application, served by
uvicorn (``jobq serve``) or mounted in any ASGI app (Starlette, FastAPI, Django's ASGI).

    from jobq.web import asgi_app
    api = asgi_app(JobQ("redis://..."), token="...")   # an ASGI callable

The application is plain ASGI (no framework: six JSON routes, and every layer between the socket
and the Redis call costs request rate); nothing in :mod:`jobq`'s core imports this package, so a
worker or a producer needs no uvicorn.
"""

from __future__ import annotations

from typing import Any

from jobq.app import JobQ
from jobq.web.api import DEFAULT_MAX_BODY, MAX_BULK, REQUEST_TIMEOUT, ApiApp, HttpError, openapi_document

__all__ = [
    "DEFAULT_MAX_BODY",
    "MAX_BULK",
    "REQUEST_TIMEOUT",
    "ApiApp",
    "ApiServer",
    "HttpError",
    "asgi_app",
    "openapi_document",
]


def asgi_app(app: JobQ, *, ui: bool = True, **options: Any) -> ApiApp:
    """The HTTP API over ``app`` as an ASGI application, with the dashboard at ``/ui`` (options as
    :class:`ApiApp`: ``token``, ``read_only``, ``max_body``, ``metrics``, ``request_timeout``), to
    serve with any ASGI server or mount under a path in a Starlette/FastAPI app."""
    return ApiApp(app, ui=ui, **options)


def __getattr__(name: str) -> Any:
    # The server (uvicorn) is imported only when asked for: mounting the app needs no uvicorn.
    if name == "ApiServer":
        from jobq.web.server import ApiServer

        return ApiServer
    raise AttributeError(name)
