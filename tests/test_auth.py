"""Token verification policy (the WebSocket side is in test_golden_path)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from netra.auth import TokenVerifier, bearer_token, mint_token
from netra.config import Config
from netra.errors import Unauthorized


def _pem(private) -> tuple[bytes, str]:
    key = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pub.decode()


@pytest.mark.parametrize(
    ("alg", "make"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_public_key_algorithms(alg, make, tmp_path):
    private, public = _pem(make())
    path = tmp_path / "key.pem"
    path.write_text(public)
    for key_setting in (public, str(path)):  # the PEM itself, or a path to it
        verifier = TokenVerifier.from_config(Config(jwt_algorithms=(alg,), jwt_public_key=key_setting))
        token = jwt.encode({"sub": "kim", "exp": int(time.time()) + 60}, private, algorithm=alg)
        assert verifier.verify(token).user_id == "kim"
    # an HS256 token signed with the public key as secret: the classic confusion attack
    forged = jwt.encode({"sub": "kim", "exp": int(time.time()) + 60}, "not-the-key-" * 4, algorithm="HS256")
    with pytest.raises(Unauthorized, match="algorithm not allowed"):
        verifier.verify(forged)


def test_issuer_and_leeway():
    config = Config(jwt_secret="k" * 32, jwt_issuer="https://id.example", jwt_leeway_s=30)
    verifier = TokenVerifier.from_config(config)
    ok = mint_token(config.jwt_secret, "a", iss="https://id.example")
    assert verifier.verify(ok).user_id == "a"
    with pytest.raises(Unauthorized, match="issuer"):
        verifier.verify(mint_token(config.jwt_secret, "a", iss="https://evil.example"))
    just_expired = jwt.encode({"sub": "a", "exp": int(time.time()) - 5, "iss": "https://id.example"},
                              config.jwt_secret, algorithm="HS256")
    assert verifier.verify(just_expired).user_id == "a"  # within the leeway


def test_misconfiguration_is_refused_at_start():
    with pytest.raises(ValueError, match="NETRA_JWT_SECRET"):
        TokenVerifier.from_config(Config())
    with pytest.raises(ValueError, match="PUBLIC_KEY"):
        TokenVerifier.from_config(Config(jwt_algorithms=("RS256",)))
    with pytest.raises(ValueError, match="unsupported"):
        TokenVerifier.from_config(Config(jwt_secret="x", jwt_algorithms=("none",)))


def test_bearer_header_parsing():
    assert bearer_token([(b"authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([(b"Authorization", b"bearer  abc ")]) == "abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) == ""  # present but refused
    assert bearer_token([(b"host", b"x")]) is None
