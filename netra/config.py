"""One frozen configuration object, passed explicitly.

Every limit and timeout netra enforces lives here with its default. A
:class:`Config` is built from (lowest precedence first) the defaults below, an
optional TOML file, ``NETRA_*`` environment variables (``NETRA_`` + the field
name in upper case), and command-line flags. Nothing reads the environment
anywhere else.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .mcp.config import McpServerConfig, parse_mcp_servers


def _doc(text: str, parse: Any = None, **kwargs: Any) -> Any:
    """An attrs field with its documentation attached (rendered in the README),
    and, for a value that is more than a scalar or a list, how to parse it."""
    return attrs.field(metadata={"doc": text, "parse": parse}, **kwargs)


def _check_workers(_config: Any, _field: Any, value: str) -> None:
    if value != "auto" and not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise ValueError(f"workers: expected a number of processes (1 or more) or auto, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    # -- network ----------------------------------------------------------
    host: str = _doc("Interface to listen on.", default="127.0.0.1")
    port: int = _doc("TCP port; 0 picks a free one.", default=8000)
    workers: str = _doc(
        "Server processes sharing the port (see docs/deployment.md): a number, or `auto` for one per "
        "core; 1 is one process and no supervisor.",
        default="1",
        converter=str,
        validator=_check_workers,
    )
    allowed_origins: tuple[str, ...] = _doc(
        "Origins allowed to open /ws and call /agui besides the server's own; '*' allows any.",
        default=(),
    )

    # -- auth -------------------------------------------------------------
    jwt_secret: str | None = _doc(
        "HS256 key. Unset: `netra serve` uses a development secret kept in data_dir/dev-secret "
        "(development mode, loopback only).",
        default=None,
        repr=False,
    )
    jwt_algorithms: tuple[str, ...] = _doc(
        "Accepted JWT algorithms (allow-list). RS256/ES256 need jwt_public_key.",
        default=("HS256",),
    )
    jwt_public_key: str | None = _doc(
        "PEM public key (or a path to one) for RS256/ES256 tokens.", default=None, repr=False
    )
    jwt_audience: str | None = _doc("Required `aud` claim, when set.", default=None)
    jwt_issuer: str | None = _doc("Required `iss` claim, when set.", default=None)
    jwt_leeway_s: float = _doc("Clock skew tolerated on `exp`/`nbf`.", default=10.0)
    dev_mode: bool = _doc(
        "Development mode (hands out /api/dev-token tokens): set by `netra serve` when no key is "
        "configured; loopback only.",
        default=False,
    )
    auth_timeout_s: float = _doc(
        "Time to authenticate after connecting before close 4408.", default=10.0
    )
    token_expiry_grace_s: float = _doc(
        "A live connection whose token expired closes 4401 this long after `exp`.",
        default=10.0,
    )

    # -- inbound frames -----------------------------------------------------
    max_message_bytes: int = _doc("Largest client frame; larger closes 1009.", default=65536)
    max_text_chars: int = _doc("Longest user_message text.", default=32000)
    max_bad_frames: int = _doc("Malformed frames tolerated before close 4400.", default=10)
    rate_per_s: float = _doc("Client messages per second per connection (sustained).", default=10.0)
    rate_burst: int = _doc("Token-bucket burst of client messages.", default=30)
    rate_abuse_limit: int = _doc(
        "Consecutive rate-limited messages before close 4429.", default=50
    )

    # -- capacity -------------------------------------------------------------
    max_connections: int = _doc(
        "Open client connections (WebSocket and HTTP), counted from their first byte.", default=10000
    )
    max_connections_per_user: int = _doc("Open connections per user.", default=16)
    max_runs: int = _doc("Concurrent runs, all users.", default=256)
    max_runs_per_user: int = _doc("Concurrent runs per user, all connections.", default=4)
    max_runs_per_connection: int = _doc("Concurrent runs per connection.", default=4)
    max_queued_runs_per_user: int = _doc("Runs a user may have waiting.", default=16)
    max_queued_runs: int = _doc("Runs waiting for global capacity.", default=4096)
    max_model_calls: int = _doc("Concurrent model calls per provider.", default=256)

    # -- per run ------------------------------------------------------------
    default_multitask: str = _doc(
        "What a message does on a busy thread: reject, enqueue or interrupt.",
        default="enqueue",
        validator=attrs.validators.in_(("reject", "enqueue", "interrupt")),
    )
    run_timeout_s: float = _doc("Wall-clock limit of one run.", default=300.0)
    max_steps: int = _doc("Model calls in one run.", default=12)
    max_tool_calls: int = _doc("Tool calls in one run.", default=24)
    tool_timeout_s: float = _doc("Default per tool call (a tool may declare its own).", default=30.0)
    approval_timeout_s: float = _doc(
        "How long a tool call that needs the user's approval waits for a decision; then it is denied "
        "(reason `timeout`). The wait holds no model, tool or global run slot (only its user's) and does not count "
        "against the run's time limit.",
        default=300.0,
    )
    model_first_chunk_timeout_s: float = _doc("Time to a model's first chunk.", default=60.0)
    model_idle_timeout_s: float = _doc("Longest silence between model chunks.", default=30.0)
    max_output_bytes: int = _doc("Largest answer of one run.", default=262144)
    max_tool_result_bytes: int = _doc("Tool results are cut to this size.", default=65536)
    history_window: int = _doc("Earlier messages of the thread given to the model.", default=20)

    # -- outbound -----------------------------------------------------------
    outbox_size: int = _doc("Events held per connection while its client is behind; more closes 4430.", default=256)
    write_timeout_s: float = _doc(
        "A write the client has not taken after this long closes the connection (4430, or cut); "
        "every socket, HTTP included.",
        default=5.0,
    )
    handshake_timeout_s: float = _doc("Time a new connection has to send its request head.", default=10.0)
    send_buffer_bytes: int = _doc(
        "Kernel send buffer of a WebSocket connection (SO_SNDBUF; 0: the system's). What it holds counts as "
        "taken by the client, so it bounds how late a client that stops reading is noticed.",
        default=131072,
    )
    close_timeout_s: float = _doc(
        "Time given to flush events and a close frame before the socket is cut.", default=2.0
    )
    heartbeat_interval_s: float = _doc("Server ping interval; 0 disables the heartbeat.", default=20.0)
    heartbeat_timeout_s: float = _doc(
        "A peer silent for interval + timeout is treated as gone.", default=20.0
    )

    # -- sessions that survive a dropped connection ------------------------
    resume_window_s: float = _doc(
        "How long a session whose connection dropped (no close frame) keeps its runs and events for a "
        "resume; 0: a drop cancels its runs at once.",
        default=30.0,
    )
    resume_buffer_bytes: int = _doc(
        "Sent events a session keeps for a resume (older ones: resync_required); memory per busy session.",
        default=65536,
    )

    # -- shutdown -----------------------------------------------------------
    drain_grace_s: float = _doc(
        "On SIGTERM/SIGINT, time running runs get to finish before they are cancelled.",
        default=10.0,
    )

    # -- agents and models ----------------------------------------------------
    model: str = _doc("Model provider: scripted or openai.", default="scripted")
    scripted_delay_ms: float = _doc("Scripted model: delay per streamed chunk.", default=0.0)
    chaos_tools: bool = _doc("Register the fault-injection tools (fail, hang, sleep, big).", default=False)
    agents: str | None = _doc("Agent set to load, as package.module:attribute.", default=None)
    mcp_servers: tuple[McpServerConfig, ...] = _doc(
        "MCP servers whose tools agents may call (see docs/mcp.md): a JSON object by server name, or "
        "`[mcp_servers.NAME]` tables in the TOML file, each with `command` (stdio) or `url` (streamable HTTP).",
        parse=parse_mcp_servers,
        default=(),
        converter=parse_mcp_servers,
    )
    openai_base_url: str = _doc("OpenAI-compatible API base URL.", default="https://api.openai.com/v1")
    openai_api_key: str | None = _doc("API key for the OpenAI-compatible provider.", default=None, repr=False)
    openai_model: str = _doc("Model name for the OpenAI-compatible provider.", default="gpt-4o-mini")
    openai_max_retries: int = _doc("Retries before the first chunk (429, 5xx, connect).", default=3)
    model_max_tokens: int = _doc(
        "Most tokens of one model answer (max_tokens); an agent may set its own.", default=4096
    )
    model_temperature: float | None = _doc(
        "Sampling temperature sent to the model; unset: the provider's. An agent may set its own.",
        default=None,
    )

    # -- store ----------------------------------------------------------------
    database_url: str | None = _doc(
        "postgresql://... for PostgreSQL, sqlite:///path for SQLite, `none` for no store. "
        "Unset: SQLite in data_dir.",
        default=None,
        repr=False,
    )
    data_dir: str = _doc("Folder for the embedded SQLite database.", default="data")
    store_pool_size: int = _doc("Database connections (PostgreSQL pool, SQLite threads).", default=8)
    store_timeout_s: float = _doc("Longest wait for one store operation.", default=10.0)

    # -- cluster --------------------------------------------------------------
    redis_url: str | None = _doc(
        "redis://... joins a cluster: limits, cancels and sessions shared through Redis by every "
        "process of every machine (PostgreSQL as the store). Unset: one process's own limits.",
        default=None,
        repr=False,
    )
    redis_prefix: str = _doc(
        "Prefix of every Redis key and channel of this cluster (two clusters may share one Redis).",
        default="netra:",
    )
    cluster_lease_ttl_s: float = _doc(
        "How long a dead node's capacity stays taken (leases are extended every third of it).",
        default=10.0,
    )

    # -- operations -----------------------------------------------------------
    log_level: str = _doc("Log level: DEBUG, INFO, WARNING, ERROR.", default="INFO")
    metrics_token: str | None = _doc(
        "Bearer token required by /metrics, when set.", default=None, repr=False
    )

    # ------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        *,
        environ: Mapping[str, str] | None = None,
        file: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Build a Config: defaults < TOML ``file`` (or ``NETRA_CONFIG``) < env < overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = file or env.get("NETRA_CONFIG")
        if path:
            with Path(path).open("rb") as f:
                data = tomllib.load(f)
            section = {_RENAMED.get(k, k): v for k, v in data.get("netra", data).items()}
            unknown = set(section) - _FIELDS.keys()
            if unknown:
                raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
            values.update({k: _coerce(_FIELDS[k], v) for k, v in section.items()})
        for old, new in _RENAMED.items():  # an earlier name still works, the new one wins
            raw = env.get(f"NETRA_{old.upper()}")
            if raw is not None:
                values[new] = _coerce(_FIELDS[new], raw)
        for name, field in _FIELDS.items():
            raw = env.get(f"NETRA_{name.upper()}")
            if raw is not None:
                values[name] = _coerce(field, raw)
        for name, value in (overrides or {}).items():
            if name not in _FIELDS:
                raise ValueError(f"unknown setting {name!r}")
            if value is not None:
                values[name] = _coerce(_FIELDS[name], value)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return attrs.evolve(self, **changes)


_FIELDS: dict[str, attrs.Attribute] = {f.name: f for f in attrs.fields(Config)}

#: Settings renamed since a release: the earlier name -> the current one.
_RENAMED: dict[str, str] = {"slow_consumer_timeout_s": "write_timeout_s"}

#: NETRA_* variables that are not server settings (the clients' and the tests').
_NOT_SETTINGS = frozenset({"NETRA_TOKEN", "NETRA_URL", "NETRA_CONFIG"})
#: Variables of netra's own tests and benchmarks (their databases and Redis).
_NOT_SETTINGS_PREFIXES = ("NETRA_TEST_", "NETRA_BENCH_")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """NETRA_* variables that name no setting: most likely misspelt, and
    otherwise silently ignored (``netra serve`` warns about them)."""
    known = {f"NETRA_{name.upper()}" for name in (*_FIELDS, *_RENAMED)} | _NOT_SETTINGS
    return sorted(
        k for k in environ
        if k.startswith("NETRA_") and k not in known and not k.startswith(_NOT_SETTINGS_PREFIXES)
    )


_TYPES = typing.get_type_hints(Config)


def _coerce(field: attrs.Attribute, value: Any) -> Any:
    """Convert a TOML or environment value to the field's declared type."""
    parse = field.metadata.get("parse")
    if parse is not None:
        return parse(value)
    kind = _TYPES[field.name]
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) and type(None) in args:
        if isinstance(value, str) and value == "":
            return None
        (kind,) = [a for a in args if a is not type(None)]
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return tuple(value)
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"{field.name}: expected a boolean, got {value!r}")
        return bool(value)
    if kind in (int, float, str):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{field.name}: expected {kind.__name__}, got {value!r}") from None
    return value


def describe() -> list[tuple[str, str, str]]:
    """(environment variable, default, meaning) for every setting, for docs."""
    rows = []
    for name, field in _FIELDS.items():
        default = field.default
        shown = "unset" if default is None else (",".join(default) if isinstance(default, tuple) else str(default))
        rows.append((f"NETRA_{name.upper()}", shown, field.metadata.get("doc", "")))
    return rows
