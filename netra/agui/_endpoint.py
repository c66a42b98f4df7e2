"""``POST /agui``: netra as an AG-UI agent, behind ``/ws``'s rules.

The checks come in ``/ws``'s order (Origin, draining, no token in the
query string, the bearer token), then its limits (the user's message rate,
the connection caps), then the body. Every refusal before the stream is an
HTTP status with the JSON body every netra refusal has (``{"code",
"message"}``), the status the error class owns, and ``Retry-After`` when
the error says when to retry. After that, the answer is always ``200
text/event-stream`` and every failure is the run's ``RUN_ERROR``
(:mod:`netra.agui._stream`).

A body with ``resume`` entries is checked against the runs paused at an
interrupt (:meth:`netra.agui._runs.AguiRuns.plan`) before the stream, so a
resume that answers nothing, leaves an interrupt unanswered or edits a call
with arguments that do not fit is refused with nothing decided. Entries
that only abandon (``cancelled``) interrupts that no longer wait change
nothing either way: such a body with a user message is an ordinary run.

A browser front end on another origin (listed in ``allowed_origins``) gets
the CORS headers it needs, preflight included; an Origin that is not
allowed is refused as ``/ws`` refuses it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final
from urllib.parse import parse_qs

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .. import _json
from ..auth import Identity, bearer_token
from ..errors import BadRequest, Busy, Forbidden, NetraError, NotFound, RateLimited, TooLarge, Unauthorized
from ..hub import Hub
from ..web.ws import origin_allowed
from ._input import RunRequest, parse_run_input
from ._runs import connection_refusal
from ._stream import AguiStream

log = logging.getLogger("netra.agui")

PATH: Final = "/agui"
#: Request rates remembered at most; past it, users whose rate has fully recovered are forgotten.
_RATES_KEPT: Final = 4096
_SSE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a buffering proxy would hold the stream back
}
_PREFLIGHT: Final = {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, content-type, accept",
    "Access-Control-Max-Age": "600",
}


def register_agui(app: QuartTrio, hub: Hub) -> None:
    """Add ``POST /agui`` (and its CORS preflight) to the app."""
    endpoint = AguiEndpoint(hub)
    app.extensions["netra.agui"] = endpoint
    app.add_url_rule(PATH, "agui", endpoint.post, methods=["POST"], provide_automatic_options=False)
    app.add_url_rule(PATH, "agui_preflight", endpoint.preflight, methods=["OPTIONS"], provide_automatic_options=False)


@attrs.define(eq=False)
class RequestRate:
    """Each user's AG-UI requests: ``/ws``'s message rate (``rate_per_s``,
    bursts of ``rate_burst``), per user rather than per connection, since
    each request is a connection of its own. A virtual-scheduling bucket:
    one number per user, the time their budget is spent until."""

    rate_per_s: float
    burst: int
    _spent_until: dict[str, float] = attrs.field(factory=dict)

    def take(self, user_id: str) -> int | None:
        """None when the request may go; otherwise milliseconds to wait."""
        if self.rate_per_s <= 0:
            return None
        now = trio.current_time()
        interval = 1.0 / self.rate_per_s
        spent = max(self._spent_until.get(user_id, now), now)
        if spent + interval - now > self.burst * interval:
            return max(1, math.ceil((spent + interval - now - self.burst * interval) * 1000))
        self._spent_until[user_id] = spent + interval
        if len(self._spent_until) > _RATES_KEPT:
            self._spent_until = {u: t for u, t in self._spent_until.items() if t > now}
        return None


@attrs.define(eq=False)
class AguiEndpoint:
    hub: Hub
    rate: RequestRate = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        c = self.hub.config
        self.rate = RequestRate(c.rate_per_s, c.rate_burst)

    async def post(self) -> Any:
        hub = self.hub
        cors: dict[str, str] = {}
        try:
            cors = self._cors()
            who = self._check()
            body = await _body(hub.config.handshake_timeout_s)
            run = parse_run_input(body, max_text_chars=hub.config.max_text_chars)
            if run.agent is not None and run.agent not in hub.agents:
                raise NotFound(f"no agent named {run.agent!r}; known: {', '.join(a.name for a in hub.agents)}")
            resuming = _resumes(hub, who, run)
            # a thread the store does not know is created, with the client's id, for this user;
            # one it knows is continued, and the run's store write checks it is this user's
            new_thread = not resuming and not await hub.store.history(run.thread_id, limit=1)
        except NetraError as exc:
            return _refusal(exc, cors)
        stream = AguiStream(hub=hub, identity=who, request=run, new_thread=new_thread, resuming=resuming)
        response = Response(stream, status=200, headers={**_SSE_HEADERS, **cors}, content_type="text/event-stream")
        response.timeout = None  # the run's own limits bound it, not quart's response timeout
        return response

    async def preflight(self) -> Any:
        """A cross-origin front end asks before its first POST."""
        try:
            cors = self._cors()
        except NetraError as exc:
            return _refusal(exc, {})
        return Response(b"", status=204, headers={**cors, **_PREFLIGHT} if cors else {})

    def _cors(self) -> dict[str, str]:
        origin = request.headers.get("origin")
        if origin is None:
            return {}
        if not origin_allowed(origin, request.headers.get("host"), self.hub.config.allowed_origins):
            raise Forbidden("origin not allowed")
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def _check(self) -> Identity:
        """``/ws``'s rules and limits, before the body is read."""
        hub, c = self.hub, self.hub.config
        if hub.draining:
            raise Busy("server is shutting down", retry_after_ms=int(c.drain_grace_s * 1000))
        if {"token", "access_token", "jwt"} & parse_qs(request.query_string.decode("latin-1")).keys():
            raise BadRequest("tokens are never accepted in the query string; use the Authorization header")
        header = request.headers.get("authorization")
        token = None if header is None else bearer_token([(b"authorization", header.encode("latin-1"))])
        if not token:
            raise Unauthorized("missing bearer token")
        who = hub.verifier.verify(token)  # Unauthorized
        wait_ms = self.rate.take(who.user_id)
        if wait_ms is not None:
            raise RateLimited("too many requests; slow down", retry_after_ms=wait_ms)
        refusal = connection_refusal(hub, hub.users.get(who.user_id))
        if refusal is not None:
            raise refusal
        return who


def _resumes(hub: Hub, who: Identity, run: RunRequest) -> bool:
    """Whether the request resumes a paused run (planned: nothing is decided
    yet) or starts one. A plan that does not hold is the request's refusal
    (NotFound, BadRequest, RunInProgress); but entries that only abandon
    (``cancelled``) what no longer waits change nothing, so with a user
    message they are an ordinary run of that message."""
    if not run.resume:
        return False
    try:
        hub.agui.plan(who.user_id, run)
    except NotFound:
        if run.text is None or any(a.status != "cancelled" for a in run.resume):
            raise
        return False
    return True


async def _body(timeout_s: float) -> bytes:
    """The request body, within the app's size limit and ``timeout_s`` (as JSON refusals)."""
    with trio.move_on_after(timeout_s):
        try:
            return await request.get_data(cache=False)
        except HTTPException as exc:  # quart's 413 (MAX_CONTENT_LENGTH) and 408 (BODY_TIMEOUT)
            if exc.code == 413:
                raise TooLarge("the request body is too large") from None
            raise BadRequest(f"the request body could not be read ({exc.code} {exc.name})") from None
    raise BadRequest(f"the request body did not arrive within {timeout_s:g}s")


def _refusal(exc: NetraError, cors: dict[str, str]) -> Response:
    """A refusal before any stream: the error's status and netra's JSON error body."""
    log.info("agui request refused: %s", exc.message, extra={"code": exc.http_status})
    headers = dict(cors)
    retry_ms = exc.extra.get("retry_after_ms")
    if retry_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if retry_ms is not None:
        body["retry_after_ms"] = retry_ms
    return Response(_json.dumps(body), status=exc.http_status, headers=headers, content_type="application/json")
