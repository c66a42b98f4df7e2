"""JWT verification and development tokens.

pyjwt does the cryptography; this module decides policy: an algorithm
allow-list (``alg: none`` and algorithm confusion are refused by construction),
required ``exp`` and ``sub``, optional ``aud``/``iss``, a small leeway, and
the type and range of every registered claim (a validly signed token is
still input from outside: ``"exp": 1e400`` must be refused, not crash the
server). Every exception raised while verifying, pyjwt's or any other, is
translated into :class:`netra.errors.Unauthorized` here, at the edge; the
token itself is never logged or echoed back.

Development mode keeps its HS256 secret in ``NETRA_DATA_DIR/dev-secret``
(mode 0600, created once and reused), so ``netra token`` and the README's
example can mint tokens for a server started on the defaults, and tokens
survive a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Mapping
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
DEV_SECRET_FILE = "dev-secret"

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


# -- development mode ------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8,
    ::1, localhost). Anything else, a name included, may face a network."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dev_secret_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / DEV_SECRET_FILE


def read_dev_secret(data_dir: str | os.PathLike[str]) -> str | None:
    """The development secret kept in ``data_dir``, or None when there is
    none yet. Refuses (ValueError) a file other users may read, or an empty one."""
    path = dev_secret_path(data_dir)
    try:
        with path.open("r", encoding="ascii") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read().strip()
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} may be read by other users: chmod 600 it, or delete it to get a new one")
    if len(secret) < 32:
        raise ValueError(f"{path} does not hold a secret: delete it to get a new one")
    return secret


def dev_secret(data_dir: str | os.PathLike[str]) -> tuple[str, bool]:
    """The development secret of ``data_dir``, created (mode 0600) on first
    use and reused after; and whether it was created now. Two servers
    starting at once agree on one secret: the file appears whole or not at
    all (written aside, then hard-linked into place)."""
    existing = read_dev_secret(data_dir)
    if existing is not None:
        return existing, False
    path = dev_secret_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{DEV_SECRET_FILE}.{secrets.token_hex(8)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(scratch, path)
            created = True
        except FileExistsError:
            created = False  # another process got there first: use its secret
    finally:
        scratch.unlink(missing_ok=True)
    secret = read_dev_secret(data_dir)
    assert secret is not None
    return secret, created


def signing_secret(config: Config) -> tuple[str, str]:
    """The HS256 key a local server started with ``config`` accepts, and
    where it came from: ``NETRA_JWT_SECRET``, else the development secret
    in ``NETRA_DATA_DIR``. ValueError when there is neither."""
    if config.jwt_secret:
        return config.jwt_secret, "NETRA_JWT_SECRET"
    secret = read_dev_secret(config.data_dir)
    if secret is None:
        raise ValueError(
            f"no key: set NETRA_JWT_SECRET (the server's HS256 key), or start `netra serve` once "
            f"without it so that it keeps a development secret in {dev_secret_path(config.data_dir)}"
        )
    return secret, f"the development secret in {dev_secret_path(config.data_dir)}"


def dev_token(
    user_id: str,
    *,
    ttl_s: float = 3600.0,
    config: Config | None = None,
    environ: Mapping[str, str] | None = None,
    secret: str | None = None,
) -> str:
    """A token that a server started here, on the same settings, accepts:
    what ``netra token --user ID`` prints. Signed with ``NETRA_JWT_SECRET``,
    else with the development secret that ``netra serve`` keeps in
    ``NETRA_DATA_DIR`` (``secret`` when the caller already has it); carries
    ``aud``/``iss`` when those are configured. ValueError when there is no key."""
    config = config or Config.load(environ=environ)
    if secret is None:
        secret, _ = signing_secret(config)
    claims = {k: v for k, v in (("aud", config.jwt_audience), ("iss", config.jwt_issuer)) if v}
    return mint_token(secret, user_id, ttl_s=ttl_s, **claims)
