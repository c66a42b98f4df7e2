"""The command line: ``netra serve``, ``netra token``, ``netra chat``."""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import sys

import trio

from . import __version__
from .auth import mint_token
from .config import Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netra", description="Run AI agents for chat users over WebSocket.")
    parser.add_argument("--version", action="version", version=f"netra {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", help="TOML file of settings (see README)")
    serve.add_argument("--agents", help="agent set to load, as package.module:attribute")

    token = sub.add_parser("token", help="print a development token signed with NETRA_JWT_SECRET")
    token.add_argument("--user", required=True)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")

    chat = sub.add_parser("chat", help="chat with an agent in the terminal")
    chat.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    chat.add_argument("--token", default=os.environ.get("NETRA_TOKEN"))
    chat.add_argument("--agent")

    args = parser.parse_args(argv)
    match args.command:
        case "serve":
            return _serve(args)
        case "token":
            secret = os.environ.get("NETRA_JWT_SECRET")
            if not secret:
                print("netra token: set NETRA_JWT_SECRET (the server's HS256 key)", file=sys.stderr)
                return 2
            print(mint_token(secret, args.user, ttl_s=args.ttl))
            return 0
        case "chat":
            from .client.terminal import run_chat

            return run_chat(url=args.url, token=args.token, agent=args.agent)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from . import logs
    from .hub import Hub
    from .server import serve_forever

    try:
        config = Config.load(
            file=args.config, overrides={"host": args.host, "port": args.port, "agents": args.agents}
        )
    except (ValueError, OSError) as exc:
        print(f"netra serve: {exc}", file=sys.stderr)
        return 2
    if config.jwt_secret is None and "HS256" in config.jwt_algorithms:
        config = config.replace(jwt_secret=secrets.token_urlsafe(32), dev_mode=True)
    logs.configure(config.log_level)
    try:
        hub = Hub.build(config)
    except (ValueError, ImportError) as exc:
        print(f"netra serve: {exc}", file=sys.stderr)
        return 2

    def ready(server) -> None:
        print(f"netra {__version__} listening on {server.http_url}", file=sys.stderr, flush=True)
        print(f"  Web chat:  {server.http_url}/", file=sys.stderr, flush=True)
        print(f"  WebSocket: {server.ws_url}", file=sys.stderr, flush=True)
        if config.dev_mode:
            claims = {k: v for k, v in (("aud", config.jwt_audience), ("iss", config.jwt_issuer)) if v}
            token = mint_token(config.jwt_secret, "dev-user", ttl_s=24 * 3600, **claims)
            print("  development mode: a secret was generated for this run only", file=sys.stderr)
            print(f"  token (user dev-user, 24 h): {token}", file=sys.stderr)
            print(f"  try: {_self_command()} chat --url {server.ws_url} --token {token}", file=sys.stderr, flush=True)

    trio.run(functools.partial(serve_forever, hub, on_ready=ready))
    return 0


def _self_command() -> str:
    """How this program was started (``.venv/bin/netra`` under make), for hints."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "netra" and os.path.exists(argv0):
        return os.path.relpath(argv0)
    return "netra"
