"""JWT verification and development tokens.

pyjwt does the cryptography; this module decides policy: an algorithm
allow-list (``alg: none`` and algorithm confusion are refused by construction),
required ``exp`` and ``sub``, optional ``aud``/``iss``, a small leeway, and
the type and range of every registered claim (a validly signed token is
still input from outside: ``"exp": 1e400`` must be refused, not crash the
server). Every exception raised while verifying, pyjwt's or any other, is
translated into :class:`netra.errors.Unauthorized` here, at the edge; the
token itself is never logged or echoed back.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import attrs
import jwt

from .config import Config
from .errors import Unauthorized

_SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "EdDSA"})
_MAX_TOKEN_CHARS = 8192
_MAX_SUB_CHARS = 256
#: The last second of year 9999: NumericDate claims past it are refused, so
#: every accepted date is a finite float the rest of the server can use.
MAX_NUMERIC_DATE = 253402300799

log = logging.getLogger("netra.auth")


@attrs.frozen(kw_only=True)
class Identity:
    """Who a verified token says the caller is."""

    user_id: str
    expires_at: float  # epoch seconds


@attrs.define(eq=False)
class TokenVerifier:
    """Verifies bearer tokens against the configured keys and claims."""

    algorithms: tuple[str, ...]
    secret: str | None = attrs.field(repr=False, default=None)
    public_key: str | None = attrs.field(repr=False, default=None)
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = 10.0

    @classmethod
    def from_config(cls, config: Config) -> TokenVerifier:
        algorithms = tuple(config.jwt_algorithms)
        unknown = set(algorithms) - _SYMMETRIC - _ASYMMETRIC
        if not algorithms or unknown:
            raise ValueError(f"unsupported JWT algorithms: {sorted(unknown) or 'none given'}")
        public_key = config.jwt_public_key
        if public_key and not public_key.lstrip().startswith("-----BEGIN"):
            public_key = Path(public_key).read_text()
        if set(algorithms) & _SYMMETRIC and not config.jwt_secret:
            raise ValueError("HS* algorithms need NETRA_JWT_SECRET")
        if set(algorithms) & _ASYMMETRIC and not public_key:
            raise ValueError("RS*/ES* algorithms need NETRA_JWT_PUBLIC_KEY")
        return cls(
            algorithms=algorithms,
            secret=config.jwt_secret,
            public_key=public_key,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway_s=config.jwt_leeway_s,
        )

    def verify(self, token: str) -> Identity:
        """The identity a token proves, or :class:`Unauthorized`: never any
        other exception, whatever the token holds."""
        try:
            return self._verify(token)
        except Unauthorized:
            raise
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the '{exc.claim}' claim") from None
        except Exception as exc:  # the edge: pyjwt, json, base64, crypto, numbers
            log.debug("token refused: %s", type(exc).__name__)
            raise Unauthorized("invalid token") from None

    def _verify(self, token: str) -> Identity:
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            raise Unauthorized("invalid token")
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthorized("token algorithm not allowed")
        key = self.secret if alg in _SYMMETRIC else self.public_key
        claims = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway_s,
            options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
        )
        return Identity(user_id=_subject(claims), expires_at=_registered_dates(claims))


def _subject(claims: dict[str, Any]) -> str:
    """``sub`` is the user id; ``iss`` and ``aud``, when present, must have
    the types RFC 7519 gives them even when the server does not check them."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUB_CHARS:
        raise Unauthorized(f"token 'sub' must be a non-empty string of at most {_MAX_SUB_CHARS} characters")
    if "iss" in claims and not isinstance(claims["iss"], str):
        raise Unauthorized("token 'iss' must be a string")
    aud = claims.get("aud")
    if "aud" in claims and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise Unauthorized("token 'aud' must be a string or a list of strings")
    return sub


def _registered_dates(claims: dict[str, Any]) -> float:
    """``exp`` (and ``nbf``/``iat`` when present) as seconds since the epoch:
    a number, not a bool or a string, between 0 and the end of year 9999.
    Returns ``exp``."""
    for name in ("exp", "nbf", "iat"):
        if name not in claims:
            continue
        value = claims[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= MAX_NUMERIC_DATE  # also refuses NaN
        ):
            raise Unauthorized(f"token '{name}' must be a date in seconds since the epoch")
    return float(claims["exp"])


def mint_token(secret: str, user_id: str, *, ttl_s: float = 3600.0, **claims: object) -> str:
    """An HS256 token for development and tests (``netra token``)."""
    now = time.time()
    payload = {"sub": user_id, "iat": int(now), "exp": math.ceil(now + ttl_s), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # present but not a bearer token: refused, not ignored
    return None

