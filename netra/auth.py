"""JWT verification and development tokens.

pyjwt does the cryptography; this module decides policy: an algorithm
allow-list (``alg: none`` and algorithm confusion are refused by construction),
required ``exp`` and ``sub``, optional ``aud``/``iss``, a small leeway. Every
pyjwt exception is translated into :class:`netra.errors.Unauthorized` here, at
the edge; the token itself is never logged or echoed back.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import attrs
import jwt

from .config import Config
from .errors import Unauthorized

_SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "EdDSA"})
_MAX_TOKEN_CHARS = 8192


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
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise Unauthorized("invalid token")
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self.algorithms:
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
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the '{exc.claim}' claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("invalid token") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise Unauthorized("token 'sub' must be a non-empty string")
        return Identity(user_id=sub, expires_at=float(claims["exp"]))


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
