"""The chat page: ``/``, its static files, and development tokens.

The page is a handful of plain files in ``netra/web/static`` (no build step,
no CDN), so it works offline and ships inside the wheel; the libraries it
uses are copied, as published, into ``static/vendor`` (see the README there).
They are read once, when the app is built, into an immutable table: a request
can only name a file that was there at start-up, so no path from the URL ever
reaches the file system. Each file gets an ETag so browsers revalidate cheaply.

``GET /api/dev-token`` hands out a token for ``dev-user`` only in development
mode (``netra serve`` generated its own secret, so the tokens can open nothing
that outlives the process); everywhere else it answers 404, exactly like a
route that does not exist.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Mapping
from importlib import resources
from typing import Any

import attrs
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from ..auth import mint_token
from ..hub import Hub

DEV_USER = "dev-user"
DEV_TOKEN_TTL_S = 24 * 3600

_TYPES: Mapping[str, str] = types.MappingProxyType({
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
})


@attrs.frozen
class StaticFile:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, content_type: str) -> StaticFile:
        return cls(body=body, content_type=content_type, etag='"' + hashlib.sha256(body).hexdigest()[:20] + '"')


#: Folders of the static folder whose files are served too, as ``vendor/NAME``.
_SUBFOLDERS = ("vendor",)


def load_static() -> Mapping[str, StaticFile]:
    """Every servable file of the static folder (and of its vendor folder,
    as ``vendor/NAME``), by name, read once.

    importlib.resources rather than a path next to ``__file__`` so it also
    works from a zipped or otherwise packaged install."""
    static = resources.files("netra.web") / "static"
    files = {}
    for prefix, folder in (("", static), *((f"{sub}/", static / sub) for sub in _SUBFOLDERS)):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if entry.is_file() and suffix in _TYPES and not entry.name.startswith("."):
                files[prefix + entry.name] = StaticFile.of(entry.read_bytes(), _TYPES[suffix])
    return types.MappingProxyType(files)


def _security_headers(response: Response) -> Response:
    """A strict policy: the page loads nothing from elsewhere and talks only
    to its own origin (``connect-src`` names ws/wss of this host explicitly
    because older browsers do not let ``'self'`` cover WebSocket URLs)."""
    host = request.host
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' ws://{host} wss://{host}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def register_pages(app: QuartTrio, hub: Hub) -> None:
    static = load_static()
    dev_mode = hub.config.dev_mode
    # The page learns whether to offer the development-token button from the
    # server, so it never has to probe /api/dev-token (which mints a token).
    # The ETag follows the body, so a browser never keeps the other variant.
    flag = b'data-dev-mode="true"' if dev_mode else b'data-dev-mode="false"'
    index = StaticFile.of(static["index.html"].body.replace(b'data-dev-mode="false"', flag), _TYPES[".html"])

    def serve(file: StaticFile) -> Any:
        if file.etag in request.headers.get("If-None-Match", ""):
            response = Response(b"", status=304)
        else:
            response = Response(file.body, content_type=file.content_type)
        response.headers["ETag"] = file.etag
        response.headers["Cache-Control"] = "no-cache"  # always revalidate: a new version shows at once
        return _security_headers(response)

    @app.get("/")
    async def chat_page() -> Any:
        return serve(index)

    @app.get("/static/<name>")
    @app.get("/static/<sub>/<name>")
    async def static_file(name: str, sub: str | None = None) -> Any:
        file = static.get(f"{sub}/{name}" if sub else name)
        if file is None or name == "index.html":
            return jsonify(code="not_found", message="no such file"), 404
        return serve(file)

    @app.get("/api/dev-token")
    async def dev_token() -> Any:
        if not dev_mode:
            return jsonify(code="not_found", message="development tokens are offered only in development mode"), 404
        c = hub.config
        # carry the claims the verifier insists on, or the token would be refused
        claims = {k: v for k, v in (("aud", c.jwt_audience), ("iss", c.jwt_issuer)) if v}
        token = mint_token(c.jwt_secret, DEV_USER, ttl_s=DEV_TOKEN_TTL_S, **claims)
        response = jsonify(token=token, user_id=DEV_USER, expires_in_s=DEV_TOKEN_TTL_S)
        response.headers["Cache-Control"] = "no-store"
        return response
