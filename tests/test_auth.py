"""Token verification policy (the WebSocket side is in test_golden_path),
claims of every type and size (property-based, then end to end through a
real server), and the development secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netra.auth import MAX_NUMERIC_DATE, Identity, TokenVerifier, bearer_token, mint_token
from netra.client import ConnectionClosed, ConnectionRefused, connect
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


# -- claims from outside: a valid identity or Unauthorized, never anything else ----
#
# A token whose signature is valid is still input from outside. Whatever its
# claims hold (numbers too large for a float, NaN, strings, lists, objects),
# the verifier answers with an identity or Unauthorized, so the server answers
# 401 / 4401 / an `unauthorized` error event, never 500, 1006 or 1011.

SECRET = "k" * 32
NOW = int(time.time())
LEEWAY = 10.0
PROPERTY = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: str, *, secret: str = SECRET, header: str = '{"alg":"HS256","typ":"JWT"}') -> str:
    """An HS256 token over ``payload`` exactly as given: JSON that pyjwt's
    encoder would refuse (1e400, NaN, Infinity, 5,000-digit integers) included."""
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def payload_text(claims: dict[str, str]) -> str:
    """A JSON object from claim names to JSON texts (kept verbatim)."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in claims.items()) + "}"


def verifiers() -> list[TokenVerifier]:
    return [
        TokenVerifier.from_config(Config(jwt_secret=SECRET)),
        TokenVerifier.from_config(Config(jwt_secret=SECRET, jwt_audience="netra", jwt_issuer="https://id.example")),
    ]


# JSON texts of values of every kind, including the ones no encoder writes
HUGE = ["1" + "0" * 400, "-1" + "0" * 400, "1" + "0" * 5000, "1e400", "-1e400", "1e308", "NaN", "Infinity",
        "-Infinity", str(2**63), str(2**64), str(MAX_NUMERIC_DATE + 1), "1e-320"]
scalars = st.one_of(
    st.sampled_from(HUGE),
    st.just("null"),
    st.booleans().map(json.dumps),
    st.integers(min_value=-(10**30), max_value=10**30).map(json.dumps),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(max_size=300).map(json.dumps),
    st.integers(min_value=NOW - 10**6, max_value=NOW + 10**6).map(lambda n: json.dumps(str(n))),  # a date as a string
)
json_texts = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.dictionaries(st.text(max_size=8), inner, max_size=4).map(payload_text),
    ),
    max_leaves=8,
)
good_date = st.integers(min_value=NOW + 120, max_value=MAX_NUMERIC_DATE).map(json.dumps)
good_sub = st.text(min_size=1, max_size=256).map(json.dumps)
REGISTERED = ["exp", "nbf", "iat", "sub", "aud", "iss", "jti"]


def valid_claims(verifier: TokenVerifier) -> dict[str, str]:
    claims = {"sub": json.dumps("kim"), "exp": json.dumps(NOW + 3600), "iat": json.dumps(NOW), "nbf": json.dumps(NOW)}
    if verifier.audience:
        claims["aud"] = json.dumps(verifier.audience)
    if verifier.issuer:
        claims["iss"] = json.dumps(verifier.issuer)
    return claims


def outcome(verifier: TokenVerifier, token: str) -> Identity | Unauthorized:
    """The verifier's answer; any exception other than Unauthorized fails the test."""
    try:
        identity = verifier.verify(token)
    except Unauthorized as exc:
        assert exc.code == "unauthorized" and exc.close_code == 4401
        assert exc.message and len(exc.message.encode()) <= 123  # fits a WebSocket close reason
        return exc
    assert isinstance(identity.user_id, str) and 0 < len(identity.user_id) <= 256
    assert isinstance(identity.expires_at, float) and math.isfinite(identity.expires_at)
    assert NOW - LEEWAY - 60 < identity.expires_at <= MAX_NUMERIC_DATE
    return identity


@PROPERTY
@given(claims=st.dictionaries(st.sampled_from(REGISTERED) | st.text(max_size=5), json_texts, max_size=8))
def test_any_claims_give_an_identity_or_unauthorized(claims):
    for verifier in verifiers():
        outcome(verifier, signed(payload_text(claims)))


@PROPERTY
@given(claim=st.sampled_from(REGISTERED), value=json_texts, data=st.data())
def test_one_foreign_claim_in_a_valid_token(claim, value, data):
    """A valid token with one registered claim replaced by anything: either
    that value is a proper one for the claim, or the token is Unauthorized."""
    for verifier in verifiers():
        claims = valid_claims(verifier) | {claim: value}
        result = outcome(verifier, signed(payload_text(claims)))
        decoded = _loads(value)
        if isinstance(result, Identity):
            match claim:
                case "exp" | "nbf" | "iat":
                    assert type(decoded) in (int, float) and 0 <= decoded <= MAX_NUMERIC_DATE, value
                case "sub":
                    assert result.user_id == decoded
                case "aud":  # checked only when configured, but always of its type
                    assert isinstance(decoded, str) or (
                        isinstance(decoded, list) and all(isinstance(a, str) for a in decoded)
                    ), value
                    if verifier.audience is not None:
                        assert verifier.audience in ([decoded] if isinstance(decoded, str) else decoded), value
                case "iss":
                    assert isinstance(decoded, str) and decoded == (verifier.issuer or decoded), value
                case "jti":
                    assert isinstance(decoded, str), value


@pytest.mark.parametrize(
    "value",
    ["1" + "0" * 400, "1e400", "Infinity", "-Infinity", "NaN", "-1", "-1e300", str(MAX_NUMERIC_DATE + 1),
     '"4102444800"', "true", "[4102444800]", '{"n": 1}', "null", "1" + "0" * 5000],
)
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_dates_of_the_wrong_type_or_size_are_unauthorized(claim, value):
    (verifier, _) = verifiers()
    claims = valid_claims(verifier) | {claim: value}
    with pytest.raises(Unauthorized):
        verifier.verify(signed(payload_text(claims)))


@pytest.mark.parametrize(
    ("claim", "value"),
    [("sub", "42"), ("sub", '["kim"]'), ("sub", '""'), ("sub", json.dumps("x" * 257)), ("sub", "null"),
     ("sub", '{"id": "kim"}'), ("iss", "[1]"), ("iss", "7"), ("aud", '{"a": 1}'), ("aud", "[1, 2]"), ("aud", "3"),
     ("jti", "[]")],
)
def test_other_claims_of_the_wrong_type_are_unauthorized(claim, value):
    for verifier in verifiers():
        with pytest.raises(Unauthorized):
            verifier.verify(signed(payload_text(valid_claims(verifier) | {claim: value})))


@PROPERTY
@given(sub=good_sub, exp=good_date)
def test_well_formed_claims_are_accepted(sub, exp):
    for verifier in verifiers():
        claims = valid_claims(verifier) | {"sub": sub, "exp": exp}
        identity = outcome(verifier, signed(payload_text(claims)))
        assert identity == Identity(user_id=json.loads(sub), expires_at=float(json.loads(exp)))


@PROPERTY
@given(token=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b64(b) + "." + b64(b) + "." + b64(b)),
       header=json_texts)
def test_garbage_tokens_and_headers_are_unauthorized(token, header):
    (verifier, _) = verifiers()
    assert isinstance(outcome(verifier, token), Unauthorized)
    assert isinstance(outcome(verifier, signed(payload_text(valid_claims(verifier)), header=header)), Unauthorized)


def test_a_token_that_is_not_a_string_is_unauthorized():
    (verifier, _) = verifiers()
    for token in (None, 42, b"bytes", ["a.b.c"]):
        with pytest.raises(Unauthorized):
            verifier.verify(token)  # type: ignore[arg-type]


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None  # more digits than Python converts: never a proper value


# -- the same tokens against a real server: 401, 4401, an `unauthorized` event ----

BAD_CLAIMS = {
    "exp-huge": {"exp": "1" + "0" * 400},
    "exp-1e400": {"exp": "1e400"},
    "exp-infinity": {"exp": "Infinity"},
    "exp-string": {"exp": '"4102444800"'},
    "exp-list": {"exp": "[4102444800]"},
    "nbf-huge": {"nbf": "1" + "0" * 400},
    "iat-negative": {"iat": "-1e300"},
    "sub-list": {"sub": '["alice"]'},
    "sub-empty": {"sub": '""'},
    "sub-huge": {"sub": json.dumps("a" * 5000)},
    "iss-list": {"iss": '["x"]'},
    "aud-object": {"aud": '{"a": 1}'},
}


def server_token(server, **changes: str) -> str:
    claims = {"sub": json.dumps("alice"), "exp": json.dumps(NOW + 3600)} | changes
    return signed(payload_text(claims), secret=server.hub.config.jwt_secret)


@pytest.mark.parametrize("changes", BAD_CLAIMS.values(), ids=BAD_CLAIMS.keys())
async def test_foreign_claims_end_to_end(server, changes):
    token = server_token(server, **changes)
    with trio.fail_after(10):
        with pytest.raises(ConnectionRefused) as refused:  # on the upgrade
            async with connect(server.ws_url, token):
                pass
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")

        with pytest.raises(ConnectionClosed) as closed:  # in the first frame
            async with connect(server.ws_url, token, auth="frame"):
                pass
        assert closed.value.code == 4401

        async with httpx.AsyncClient(base_url=server.http_url) as http:
            response = await http.get("/api/threads", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"

        async with connect(server.ws_url, server_token(server), record=True) as conn:  # as a refresh
            await conn.refresh(token)
            await conn.ping()
            refused_refresh = [r.raw for r in conn.received if r.type == "error"]
            assert [e["code"] for e in refused_refresh] == ["unauthorized"]
            assert (await conn.collect("still here?"))[-1].type == "agent_completed"
