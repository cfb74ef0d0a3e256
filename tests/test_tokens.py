"""Stream tokens, the access decision and CORS headers, as pure functions (no processes)."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from streamcoord.access import Permit, Refusal, authorize, bearer_token, require_secret
from streamcoord.cors import preflight, response_headers
from streamcoord.errors import ConfigurationError
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings
from streamcoord.tokens import LEEWAY_SECONDS, MAX_STREAMS, Grant, TokenInvalid, mint, verify

SECRET = "s" * 64  # long enough for HS512 too (the HS512 case must fail on its algorithm)
OTHER_SECRET = "o" * 64
JOB = TaskRef("shop", "Job", "1")
OTHER = TaskRef("shop", "Job", "2")
TOKEN_MODE = Settings(secret=SECRET)


def forge(claims: dict[str, object], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def unsigned(claims: dict[str, object]) -> str:
    """A token that names ``alg: none`` (no signature at all)."""
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def test_a_minted_token_grants_its_streams_and_nothing_else() -> None:
    grant = verify(SECRET, mint(SECRET, [JOB], expires_in=60, subject="user:7"))
    assert grant.streams == frozenset({JOB}) and grant.subject == "user:7" and not grant.start
    assert grant.covers(JOB) and not grant.covers(OTHER)
    assert grant.may_name(None, "job", "1") and grant.may_name("SHOP", "Job", "1")
    assert not grant.may_name(None, "Job", "2") and not grant.may_name("other", "Job", "1")


def test_the_start_claim_is_carried() -> None:
    assert verify(SECRET, mint(SECRET, [JOB], expires_in=60, start=True)).start


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(mint(OTHER_SECRET, [JOB], expires_in=60), id="other secret"),
        pytest.param(mint(SECRET, [JOB], expires_in=60)[:-3] + "abc", id="tampered signature"),
        pytest.param(unsigned({"streams": [JOB.label], "exp": int(time.time()) + 60}), id="alg none"),
        pytest.param(jwt.encode({"streams": [JOB.label], "exp": int(time.time()) + 60}, SECRET, algorithm="HS512"), id="HS512"),
        pytest.param(forge({"streams": [JOB.label]}), id="no exp"),
        pytest.param(forge({"exp": int(time.time()) + 60}), id="no streams"),
        pytest.param(forge({"streams": JOB.label, "exp": int(time.time()) + 60}), id="streams not a list"),
        pytest.param(forge({"streams": [], "exp": int(time.time()) + 60}), id="no stream named"),
        pytest.param(forge({"streams": ["shop.Job:{1}"], "exp": int(time.time()) + 60}), id="bad label"),
        pytest.param(forge({"streams": [7], "exp": int(time.time()) + 60}), id="label not a string"),
        pytest.param(forge({"streams": [JOB.label], "exp": "soon"}), id="exp not a number"),
        pytest.param(forge({"streams": [JOB.label], "exp": float("nan")}), id="exp NaN"),
        pytest.param(forge({"streams": [JOB.label], "exp": float("inf")}), id="exp infinite"),
        pytest.param(forge({"streams": [JOB.label], "exp": int(time.time()) + 60, "start": "yes"}), id="start not a bool"),
        pytest.param(forge({"streams": [JOB.label] * (MAX_STREAMS + 1), "exp": int(time.time()) + 60}), id="too many"),
        pytest.param("not.a.token", id="garbage"),
        pytest.param("", id="empty"),
    ],
)
def test_a_bad_token_is_invalid(token: str) -> None:
    with pytest.raises(TokenInvalid) as refused:
        verify(SECRET, token)
    assert token[:20] not in str(refused.value) or not token  # the message never repeats it


def test_expiry_allows_a_little_clock_skew_and_no_more() -> None:
    token = mint(SECRET, [JOB], expires_in=60, now=1_000_000)
    assert verify(SECRET, token, now=1_000_060 + LEEWAY_SECONDS - 1).covers(JOB)
    with pytest.raises(TokenInvalid, match="expired"):
        verify(SECRET, token, now=1_000_060 + LEEWAY_SECONDS)


def test_minting_refuses_what_no_gateway_would_accept() -> None:
    with pytest.raises(TokenInvalid):
        mint("", [JOB], expires_in=60)
    with pytest.raises(ValueError):
        mint(SECRET, [], expires_in=60)
    with pytest.raises(ValueError):
        mint(SECRET, [JOB], expires_in=0)


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"authorization": "Bearer abc"}, {}, "abc"),
        ({"authorization": "bearer  abc "}, {"token": "query"}, "abc"),  # the header wins
        ({}, {"token": "q"}, "q"),
        ({}, {}, None),
        ({}, {"token": ""}, None),
        # A site's Basic credentials, added by the browser, leave the query's token in force.
        ({"authorization": "Basic dXNlcjpwdw=="}, {"token": "q"}, "q"),
        ({"authorization": "Basic dXNlcjpwdw=="}, {}, None),
        ({"authorization": "Bearer "}, {}, Refusal(401, "use Authorization: Bearer <stream token>")),
    ],
)
def test_the_token_comes_from_the_header_or_the_query(
    headers: dict[str, str], query: dict[str, str], expected: object
) -> None:
    assert bearer_token(headers, query) == expected


def test_authorize_in_token_mode() -> None:
    good = mint(SECRET, [JOB], expires_in=60)
    starting = mint(SECRET, [JOB], expires_in=60, start=True)

    def decide(token: str | None, *path: str | None, settings: Settings = TOKEN_MODE) -> Permit | Refusal:
        query = {} if token is None else {"token": token}
        return authorize(settings, {}, query, (path[0], str(path[1]), str(path[2])))

    assert decide(None, "shop", "Job", "1") == Refusal(401, "a stream token is required: use the stream URL the application gave you")
    assert decide("junk", "shop", "Job", "1") == Refusal(401, "invalid stream token")
    assert decide("x" * 10_000, "shop", "Job", "1") == Refusal(401, "invalid stream token")
    assert decide(good, "shop", "Job", "2") == Refusal(403, "this stream token does not grant this stream")
    permit = decide(good, None, "job", "1")
    assert isinstance(permit, Permit) and permit.covers(JOB) and not permit.covers(OTHER) and not permit.start
    started = decide(starting, "shop", "Job", "1")
    assert isinstance(started, Permit) and started.start
    no_lazy = decide(starting, "shop", "Job", "1", settings=Settings(secret=SECRET, lazy_start=False))
    assert isinstance(no_lazy, Permit) and not no_lazy.start


def test_authorize_in_public_mode_needs_no_token() -> None:
    permit = authorize(Settings(stream_auth="public"), {}, {}, (None, "Job", "1"))
    assert permit == Permit(None, True) and permit.covers(OTHER)


def test_a_token_gateway_needs_its_secret() -> None:
    with pytest.raises(ConfigurationError, match="STREAMCOORD_SECRET"):
        require_secret(Settings())
    require_secret(Settings(secret=SECRET))
    require_secret(Settings(stream_auth="public"))


def test_the_secret_never_shows_in_the_settings_repr() -> None:
    assert SECRET not in repr(Settings(secret=SECRET))


def test_grants_compare_by_value() -> None:
    assert Grant.of([JOB]) == Grant.of([JOB])


# -- CORS --------------------------------------------------------------------------------------

LISTED = ("https://app.example",)


def test_a_listed_origin_may_read_with_credentials() -> None:
    assert response_headers(LISTED, {"origin": "https://app.example"}) == {
        "access-control-allow-origin": "https://app.example",
        "access-control-allow-credentials": "true",
        "vary": "Origin",
    }


def test_an_unlisted_origin_gets_no_cors_headers() -> None:
    assert response_headers(LISTED, {"origin": "https://evil.example"}) == {"vary": "Origin"}
    assert response_headers(LISTED, {}) == {"vary": "Origin"}
    assert response_headers((), {"origin": "https://app.example"}) == {}


def test_any_origin_reads_without_credentials() -> None:
    headers = response_headers(("*",), {"origin": "https://anyone.example"})
    assert headers["access-control-allow-origin"] == "https://anyone.example"
    assert "access-control-allow-credentials" not in headers


def test_preflight() -> None:
    allowed = preflight(LISTED, {"origin": "https://app.example", "access-control-request-method": "GET"})
    assert allowed is not None and "Authorization" in allowed["access-control-allow-headers"]
    assert allowed["access-control-allow-methods"] == "GET, HEAD"
    assert preflight(LISTED, {"origin": "https://evil.example"}) is None
    assert preflight((), {"origin": "https://app.example"}) is None
