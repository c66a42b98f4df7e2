"""JSON for netra's own values: orjson, with the standard library's json
as the fallback for what orjson refuses (an integer beyond 64 bits)."""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    """UTF-8 JSON; objects JSON does not know become their ``str()``."""
    try:
        return orjson.dumps(value, default=str, option=_OPTIONS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


loads = orjson.loads
