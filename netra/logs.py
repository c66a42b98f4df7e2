"""Structured logs: one JSON object per line.

Records carry ``connection_id``, ``user_id`` and ``run_id`` when the code that
logs knows them (``extra={...}``). Tokens and secrets are never passed to a
logger; as a second line of defence anything that looks like a JWT is masked.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_CONTEXT = ("connection_id", "user_id", "run_id", "thread_id", "code", "connections", "mcp_server")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _JWT.sub("[token]", json.dumps(out, ensure_ascii=False, default=str))


def configure(level: str, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("hypercorn.access").disabled = True
