"""The command line: ``netra serve``, ``netra token``, ``netra chat``.

Mistakes an operator can make (a busy port, a missing key on a public
interface, a bad setting) end in one line on stderr naming what to change,
and exit status 2; never in a traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import socket
import sys
import time
from typing import Any

import trio

from . import __version__
from .auth import (
    DEV_SECRET_FILE,
    MAX_NUMERIC_DATE,
    dev_secret,
    dev_token,
    is_loopback,
    signing_secret,
)
from .config import Config, unknown_variables
from .errors import NetraError, StoreError

log = logging.getLogger("netra")

#: Errors of ``bind``: the server never listened, so it is a setting to change.
_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netra", description="Run AI agents for chat users over WebSocket.")
    parser.add_argument("--version", action="version", version=f"netra {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", help="TOML file of settings (see README)")
    serve.add_argument("--agents", help="agent set to load, as package.module:attribute")
    serve.add_argument(
        "--workers", help="server processes sharing the port: a number, or auto for one per core (default 1)"
    )
    # set by `netra serve --workers N` on the workers it starts (see netra/workers.py)
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)

    token = sub.add_parser(
        "token",
        help="print a token signed with NETRA_JWT_SECRET, or else with the development secret in NETRA_DATA_DIR",
    )
    token.add_argument("--user", required=True)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    token.add_argument("--config", help="TOML file of settings (see README)")

    chat = sub.add_parser("chat", help="chat with an agent in the terminal")
    chat.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    chat.add_argument("--token", default=os.environ.get("NETRA_TOKEN"))
    chat.add_argument("--agent")
    chat.add_argument(
        "--plain", action="store_true",
        help="print answers as written, not rendered as markdown (so do NO_COLOR, TERM=dumb and a pipe)",
    )

    args = parser.parse_args(argv)
    match args.command:
        case "serve":
            return _serve(args)
        case "token":
            return _token(args)
        case "chat":
            from .client.terminal import run_chat

            return run_chat(url=args.url, token=args.token, agent=args.agent, plain=args.plain)
    return 2


def _token(args: argparse.Namespace) -> int:
    if not (0 < args.ttl and time.time() + args.ttl <= MAX_NUMERIC_DATE):
        print("netra token: --ttl must be a positive number of seconds (ending before year 10000)", file=sys.stderr)
        return 2
    try:
        config = Config.load(file=args.config)
        secret, source = signing_secret(config)
    except (ValueError, OSError) as exc:
        print(f"netra token: {exc}", file=sys.stderr)
        return 2
    if source != "NETRA_JWT_SECRET":
        print(f"netra token: signed with {source}", file=sys.stderr)
    print(dev_token(args.user, ttl_s=args.ttl, config=config, secret=secret))
    return 0


def _raise_open_file_limit() -> None:
    """Every connection is a file descriptor: take the hard limit, not the
    soft default (often 1024), so max_connections is what limits them."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _serve(args: argparse.Namespace) -> int:
    from . import logs
    from .hub import Hub
    from .server import serve_forever
    from .workers import worker_count

    if (args.worker is None) != (args.supervisor_fd is None):
        print("netra serve: --worker and --supervisor-fd are what `netra serve --workers N` gives its workers; "
              "start that instead", file=sys.stderr)
        return 2
    try:
        config = Config.load(
            file=args.config,
            overrides={"host": args.host, "port": args.port, "agents": args.agents, "workers": args.workers},
        )
        config, created = _development_mode(config)
    except (ValueError, OSError) as exc:
        print(f"netra serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    for name in unknown_variables(os.environ):
        print(f"netra serve: {name} is not a setting and is ignored (the settings are in the README)", file=sys.stderr)
    workers = worker_count(config.workers)
    try:
        hub = Hub.build(config)  # a supervisor only checks the settings with it
    except (ValueError, ImportError) as exc:
        print(f"netra serve: {exc}", file=sys.stderr)
        return 2
    if workers > 1:
        return _supervise(args, config, created, workers)
    _raise_open_file_limit()

    listening = False

    def ready(server) -> None:
        nonlocal listening
        listening = True
        if args.worker is None:
            # one write, so whoever reads stderr gets the whole block at once
            print(_banner(server.http_url, config, created), file=sys.stderr, flush=True)

    try:
        if args.worker is None:
            trio.run(functools.partial(serve_forever, hub, on_ready=ready))
        else:
            trio.run(_serve_worker, args, hub, ready)
    except (BaseExceptionGroup, OSError, NetraError) as failure:
        unreachable = None if listening else _first(failure, StoreError)
        if unreachable is not None:  # the database or the cluster's Redis, at start-up
            print(f"netra: cannot start: {unreachable.message}", file=sys.stderr)
            return 2
        problem = None if listening else _listen_error(failure)
        if problem is None:
            raise
        print(f"netra: cannot listen on {_address(config)}: {_strerror(problem)}", file=sys.stderr)
        return 2
    return 0


def _first(failure: BaseException, kind: type[Exception]) -> Any:
    """The first ``kind`` in what was raised (through exception groups), or None."""
    if isinstance(failure, kind):
        return failure
    if isinstance(failure, BaseExceptionGroup):
        matched, _ = failure.split(kind)
        while isinstance(matched, BaseExceptionGroup):
            matched = matched.exceptions[0]
        return matched
    return None


def _banner(http_url: str, config: Config, created: bool, *, more: tuple[str, ...] = ()) -> str:
    """What ``netra serve`` prints once it listens: where, and in development
    mode a token and how to get more."""
    ws_url = http_url.replace("http://", "ws://", 1) + "/ws"
    lines = [
        f"netra {__version__} listening on {http_url}",
        f"  Web chat:  {http_url}/",
        f"  WebSocket: {ws_url}",
        *more,
    ]
    if config.dev_mode:
        token = dev_token("dev-user", ttl_s=24 * 3600, config=config, secret=config.jwt_secret)
        where = os.path.join(config.data_dir, DEV_SECRET_FILE)
        lines += [
            f"  development mode (loopback only): signing key {'created' if created else 'reused'} in {where}",
            f"  more tokens: {_self_command()} token --user ID",
            f"  token (user dev-user, 24 h): {token}",
            f"  try: {_self_command()} chat --url {ws_url} --token {token}",
        ]
    return "\n".join(lines)


async def _serve_worker(args: argparse.Namespace, hub, ready) -> None:
    """One worker of ``netra serve --workers N`` (see netra/workers.py)."""
    from .workers import SPLIT_LIMITS, serve_as_worker

    c = hub.config
    log.info(
        "worker %d (pid %d): %s", args.worker, os.getpid(),
        ", ".join(f"{name} {getattr(c, name)}" for name in SPLIT_LIMITS),
    )
    with socket.socket(fileno=args.supervisor_fd) as supervisor:
        await serve_as_worker(hub, supervisor, on_ready=ready)


def _supervise(args: argparse.Namespace, config: Config, created: bool, workers: int) -> int:
    """``netra serve --workers N``: start N workers on one port, keep them
    running, drain them on SIGTERM/SIGINT (see netra/workers.py)."""
    from .workers import Supervisor, limits_line, reserve_port, worker_environment

    if not hasattr(socket, "SO_REUSEPORT"):
        print("netra serve: --workers needs SO_REUSEPORT, which this system lacks; use --workers 1", file=sys.stderr)
        return 2
    try:
        reserved = reserve_port(config.host, config.port)
    except OSError as exc:
        problem = _listen_error(exc)
        if problem is None:
            raise
        print(f"netra: cannot listen on {_address(config)}: {_strerror(problem)}", file=sys.stderr)
        return 2
    with reserved:
        host, port = reserved.getsockname()[:2]
        http_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        print(limits_line(config, workers), file=sys.stderr, flush=True)
        passed_on = [
            arg for flag, value in (("--config", args.config), ("--agents", args.agents)) if value is not None
            for arg in (flag, value)
        ]

        def command(slot: int, fd: int) -> list[str]:
            return [
                sys.executable, "-m", "netra", "serve", "--host", config.host, "--port", str(port),
                *passed_on, "--workers", "1", "--worker", str(slot), "--supervisor-fd", str(fd),
            ]

        def announce(pids: list[int]) -> None:
            more = (f"  Workers:   {workers}, pids {' '.join(map(str, pids))}",)
            print(_banner(http_url, config, created, more=more), file=sys.stderr, flush=True)

        # a drain takes drain_grace_s, then close_timeout_s + 1 s for the close
        # frames and as long again for the HTTP side; a few seconds to exit
        stop_timeout_s = config.drain_grace_s + 2 * (config.close_timeout_s + 1) + 5
        supervisor = Supervisor(
            count=workers, command=command, env=worker_environment(os.environ, config, workers),
            stop_timeout_s=stop_timeout_s, on_ready=announce,
        )
        return trio.run(supervisor.run)


def _development_mode(config: Config) -> tuple[Config, bool]:
    """Without a configured key, development mode: an HS256 secret kept in
    the data folder, and a token for anyone who asks (``/api/dev-token``).
    So it only ever listens on loopback. Returns the config to serve and
    whether the secret was created now."""
    needs_secret = config.jwt_secret is None and "HS256" in config.jwt_algorithms
    if (needs_secret or config.dev_mode) and not is_loopback(config.host):
        fix = (
            "no NETRA_JWT_SECRET: development mode would give a token to anyone who reaches "
            f"{config.host}; set NETRA_JWT_SECRET (or NETRA_JWT_ALGORITHMS=RS256 with NETRA_JWT_PUBLIC_KEY)"
            if needs_secret
            else f"NETRA_DEV_MODE would give a token to anyone who reaches {config.host}; unset it"
        )
        raise ValueError(f"{fix}, or listen on 127.0.0.1")
    if not needs_secret:
        return config, False
    secret, created = dev_secret(config.data_dir)
    return config.replace(jwt_secret=secret, dev_mode=True), created


def _listen_error(failure: BaseException) -> OSError | None:
    """The bind error in what was raised before the server listened, if any."""
    group = failure if isinstance(failure, BaseExceptionGroup) else BaseExceptionGroup("", [failure])
    matched, _ = group.split(
        lambda exc: isinstance(exc, socket.gaierror)
        or (isinstance(exc, OSError) and exc.errno in _LISTEN_ERRNOS)
    )
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched


def _strerror(exc: OSError) -> str:
    """"address already in use", without the socket layer's decorations."""
    if isinstance(exc.errno, int) and exc.errno > 0:
        text = os.strerror(exc.errno)
    else:  # getaddrinfo's errors are negative and carry their own text
        text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _address(config: Config) -> str:
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    return f"{host}:{config.port}"


def _self_command() -> str:
    """How this program was started (``.venv/bin/netra`` under make), for hints."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "netra" and os.path.exists(argv0):
        return os.path.relpath(argv0)
    return "netra"
