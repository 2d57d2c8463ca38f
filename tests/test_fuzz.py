"""Property tests: whatever a client sends, the proxy answers without a 500, refuses only in
ImageRouter's envelope, never shows a secret, never leaves a hold, and charges exactly what the
upstream billed (docs/how-it-works.md, docs/refusals.md); whatever a policy file says, loading it
raises `PolicyError` or nothing (docs/policies.md).

Requests are driven straight into the ASGI app (on the TestClient's portal), so the raw path,
duplicate headers and latin-1 header bytes arrive exactly as a server would hand them over.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import logging
import re
import urllib.parse
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from proxy.errors import PolicyError
from proxy.http.routing import canonical_path
from proxy.policy.load import load_policy
from proxy.policy.model import Policy
from tests.support.constants import ACCOUNT_KEY, KEY_A, KEY_B, SHA_A, SHA_B

# Hypothesis imports its patch writer (and libcst, which warns on import) only when it reports a
# falsifying example; under `filterwarnings = error` that turns the report into an INTERNALERROR.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

# The request fuzzer runs on fakeredis and on the real Redis: fakeredis is not Redis.
FAKE_AND_REAL = pytest.mark.parametrize(
    "store_target",
    [pytest.param("fake", marks=pytest.mark.fake), pytest.param("real", marks=pytest.mark.real)],
    indirect=True,
)
KEY_C = "sk-c-" + "c" * 59  # a well-formed key the policy does not know
SECRETS = (KEY_A, KEY_B, KEY_C, ACCOUNT_KEY)
POLICY = f"""
account: {{name: fz, refresh_s: 3600, models_refresh_s: 3600, max_staleness_s: 7200}}
guard: {{max_body_bytes: 4096}}
models:
  deny: ["*:free", "google/veo-*"]
  overrides: {{"google/gemini-2.5-flash": 0.05}}
groups:
  - name: team
    budgets: [{{limit_usd: 1000, period: month}}]
keys:
  - name: alice
    key_sha256: {SHA_A}
    group: team
    max_request_usd: 1.00
    budgets: [{{limit_usd: 500, period: day}}]
  - name: bob
    key_sha256: {SHA_B}
    budgets: [{{limit_usd: 0.40, period: null}}]
    models: {{deny: ["openai/*"]}}
"""
SPENDING = (
    "/v1/openai/images/generations",
    "/v1/openai/images/edits",
    "/v1/openai/videos/generations",
    "/v1/openai/chat/completions",
    "/v1/openai/responses",
)
TEXT_ROUTES = ("/v1/openai/chat/completions", "/v1/openai/responses")
REFUSAL_STATUSES = {400, 401, 402, 403, 413}

# --- requests ---------------------------------------------------------------------------------

latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60)
tokens = st.sampled_from([*SECRETS, "", "x", "sk-" + "z" * 200, "sk-é", "sk a", "\tsk"])
authorization = st.one_of(
    st.sampled_from([f"Bearer {KEY_A}", f"Bearer {KEY_B}", f"Bearer {KEY_C}"]),
    st.sampled_from([f"Bearer {KEY_A}", f"Bearer {KEY_B}", f"Bearer {KEY_C}"]),
    tokens.map(lambda t: f"Bearer {t}"),
    st.tuples(
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", "", "Bearer:"]),
        st.sampled_from([" ", "  ", "\t", "", " \t"]),
        tokens,
        st.sampled_from(["", " ", "\t", " x", "é"]),
    ).map("".join),
    latin1,
)
# Not fuzzed: the stand-in's behaviour switch, framing, 100-continue, and the headers the stand-in's
# HTTP parser (aiohttp) refuses to see twice, which ImageRouter's (Node) would take the first of.
NOT_FUZZED = {
    "x-standin",
    "expect",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "etag",
    "host",
    "max-forwards",
    "server",
    "transfer-encoding",
    "user-agent",
}
header_name = st.from_regex(r"[a-z0-9!#$%&'*+.^_`|~-]{1,16}", fullmatch=True).filter(lambda n: n not in NOT_FUZZED)
REAL_MODELS = st.sampled_from(["openai/gpt-image-1", "gemini-2.5-flash-image", "google/gemini-2.5-flash", "test/test"])
models = st.one_of(
    REAL_MODELS,
    REAL_MODELS,
    REAL_MODELS,
    REAL_MODELS,
    st.sampled_from(
        [
            "openai/gpt-image-1",
            "gemini-2.5-flash-image",
            "google/gemini-2.5-flash",
            "test/test",
            "google/veo-3.1",
            "ir/test-video",
            "openai/gpt-image-1:free",
            " openai/gpt-image-1 ",
            "OPENAI/GPT-IMAGE-1",
            "",
            "unknown/model",
        ]
    ),
    st.text(max_size=20),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
price_fields = st.fixed_dictionaries(
    {"model": models},
    optional={
        "prompt": st.text(max_size=20),
        "stream": json_values,
        "max_tokens": json_values,
        "seconds": json_values,
        "quality": json_values,
        "size": json_values,
        "n": st.integers(),
    },
)


@st.composite
def json_body(draw: st.DrawFn) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["object"] * 6 + ["value", "deep", "big"]))
    if kind == "object":
        text = json.dumps(draw(price_fields), ensure_ascii=draw(st.booleans()))
    elif kind == "value":
        text = json.dumps(draw(json_values))
    elif kind == "deep":
        depth = draw(st.sampled_from([100, 900, 1500, 4000]))  # within max_body_bytes
        opener, closer = draw(st.sampled_from([("[", ""), ("[", "]"), ('{"a":', "}")]))
        depth //= len(opener)
        text = opener * depth + "1" + closer * depth * draw(st.sampled_from([0, 1]))
    else:
        text = json.dumps({"model": "openai/gpt-image-1", "prompt": "x" * draw(st.integers(3000, 6000))})
    ctype = draw(
        st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json", ""]
        )
    )
    return text.encode(), ctype


@st.composite
def multipart_body(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = draw(st.from_regex(r"[A-Za-z0-9'()+_,.=-]{1,30}", fullmatch=True))
    parts = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["model", "prompt", "image", "stream", "seconds", "Model", 'model"'])
                | st.text(max_size=6),
                models.map(str) | st.text(max_size=20),
                st.booleans(),  # a file part
            ),
            max_size=4,
        )
    )
    chunks = []
    for name, value, is_file in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="a.png"' if is_file else "")
        part = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n"
        chunks.append(part.encode("utf-8", "replace"))
    body = b"".join(chunks) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    if draw(st.booleans()) and body:
        body = body[: draw(st.integers(0, len(body)))]  # truncated
    declared = draw(st.sampled_from([boundary, f'"{boundary}"', boundary + "x", ""]))
    ctype = "multipart/form-data" + (f"; boundary={declared}" if declared else "")
    return body, draw(st.sampled_from([ctype, ctype.upper(), "multipart/mixed; boundary=" + boundary]))


@st.composite
def form_body(draw: st.DrawFn) -> tuple[bytes, str]:
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from(["model", "prompt", "stream"]) | st.text(max_size=5), models.map(str)), max_size=4
        )
    )
    body = urllib.parse.urlencode(pairs).encode()
    if draw(st.booleans()):
        body += draw(st.binary(max_size=10))
    return body, "application/x-www-form-urlencoded"


bodies = st.one_of(
    json_body(),
    json_body(),
    json_body(),
    multipart_body(),
    form_body(),
    st.tuples(
        st.binary(max_size=200), st.sampled_from(["application/json", "text/plain", "", "application/octet-stream"])
    ),
    st.tuples(st.just(b""), st.sampled_from(["application/json", ""])),
)


def spell(draw: st.DrawFn, ch: str) -> str:
    """One character of a path spelled another way the upstream's router may still accept."""
    how = draw(st.sampled_from(["case", "percent", "dots", "slashes"]))
    if how == "case":
        return ch.swapcase()
    if how == "percent" or ch != "/":
        return "%" + "%".join(f"{b:02{draw(st.sampled_from('xX'))}}" for b in ch.encode("utf-8"))
    if how == "dots":
        return draw(st.sampled_from(["/./", "/x/../", "/%2e/", "/%2E%2E/x/../x/../"]))
    return draw(st.sampled_from(["//", "///", "/%2F", "%5C", "\\"]))  # the encoded ones are ambiguous: 400


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    mode = draw(st.sampled_from(["exact", "exact", "exact", "spelled", "spelled", "other"]))
    if mode == "other":
        base = draw(
            st.sampled_from(
                [
                    "/v2/models",
                    "/v1/credits",
                    "/v1/models",
                    "/",
                    "/v1/openai/images",
                    "/-/me",
                    "/-/metrics",
                    "/-/readyz",
                    "/-/healthz",
                    "/-/nope",
                    "/v1/openai/images/generations/x",
                ]
            )
            | st.lists(st.text(max_size=8), max_size=4).map(lambda segs: "/" + "/".join(segs))
        )
    else:
        base = draw(st.sampled_from(SPENDING))
    chars = list(base)
    if mode != "exact" and chars:
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(chars) - 1))
            chars[i] = spell(draw, chars[i])
    # a request target is ASCII: what is not (and what would end the path) goes percent-encoded
    path = "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "#?" else urllib.parse.quote(c, safe="") for c in "".join(chars)
    )
    if mode != "exact":
        path += draw(st.sampled_from(["", "/", "//", "/.", "%20"]))
        if draw(st.integers(0, 10)) == 0:
            path = "http://evil.example" + path
    if not path.startswith(("/", "http")):
        path = "/" + path
    return path.encode("ascii")


@st.composite
def good_body(draw: st.DrawFn) -> tuple[bytes, str]:
    """A body that names a real model, as JSON, multipart or urlencoded."""
    fields = {"model": draw(REAL_MODELS), "prompt": draw(st.text(max_size=20))}
    kind = draw(st.sampled_from(["json", "json", "multipart", "form"]))
    if kind == "json":
        return json.dumps(fields).encode(), "application/json"
    if kind == "form":
        return urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"
    parts = b"".join(
        f'--b0undary\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    )
    return parts + b"--b0undary--\r\n", "multipart/form-data; boundary=b0undary"


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    # Half the requests are well formed (so the guard reserves, forwards and settles), half wild.
    good = draw(st.booleans())
    methods = ["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    method = "POST" if good else draw(st.sampled_from(methods))
    raw_path = draw(st.sampled_from(SPENDING).map(str.encode) | paths()) if good else draw(paths())
    assume(not raw_path.startswith(b"/echo/"))  # the stand-in echoes headers there, secrets included
    body, ctype = draw(good_body() if good else bodies)
    deep = b"[" * 500 in body or b'{"a":' * 100 in body  # json.loads recurses on these
    if method not in ("POST", "PUT", "PATCH"):
        body = b""  # a body on GET/HEAD leaves even the stand-in's HTTP layer confused
    headers: list[tuple[str, str]] = []
    if good:
        token = draw(st.sampled_from([KEY_A, KEY_B, KEY_C]))
        headers.append(("authorization", f"Bearer {token}"))
    for _ in range(0 if good else draw(st.sampled_from([0, 1, 1, 1, 1, 1, 2]))):
        headers.append(("authorization", draw(authorization)))
    if ctype or draw(st.booleans()):
        headers.append(("content-type", ctype or draw(latin1)))
    encoding = draw(
        st.sampled_from([None, None, None, "gzip", "deflate", "GZIP", "x-gzip", "br", "identity", "gzip, gzip"])
    )
    if encoding is not None and method in ("POST", "PUT", "PATCH") and not good:
        headers.append(("content-encoding", encoding))
        if draw(st.booleans()) and encoding.lower() in ("gzip", "x-gzip"):
            body = gzip.compress(body)
        elif draw(st.booleans()) and encoding == "deflate":
            body = zlib.compress(body)
    for _ in range(draw(st.integers(0, 2))):
        headers.append(("x-request-id", draw(st.sampled_from(["req-1", "a" * 200, "", "ok:id.1-2"]) | latin1)))
    headers += draw(st.lists(st.tuples(header_name, latin1), max_size=4))
    if body or method == "POST":
        headers.append(("content-length", str(len(body))))
    query = draw(st.sampled_from([b"", b"", b"a=1", b"by_api_key=true&x=%ff", b"model=openai%2Fgpt-image-1"]))
    chunking = draw(st.integers(1, 4))
    return {
        "method": method,
        "raw_path": raw_path,
        "query": query,
        "headers": headers,
        "body": body,
        "chunks": chunking,
        "deep": deep,
    }


async def drive(app: Any, req: dict[str, Any]) -> tuple[int | None, list[tuple[bytes, bytes]], bytes]:
    """One request through the ASGI app as a server would deliver it; the app's answer, raw."""
    body: bytes = req["body"]
    size = max(1, -(-len(body) // req["chunks"]))
    pending = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    done = asyncio.Event()
    status: int | None = None
    out_headers: list[tuple[bytes, bytes]] = []
    out_body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status, out_headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            out_body.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    raw_path: bytes = req["raw_path"]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req["method"],
        "scheme": "http",
        "path": urllib.parse.unquote(raw_path.decode("ascii")),  # as uvicorn does
        "raw_path": raw_path,
        "query_string": req["query"],
        "root_path": "",
        "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in req["headers"]],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    try:
        await asyncio.wait_for(app(scope, receive, send), 15)
    finally:
        done.set()
    return status, out_headers, b"".join(out_body)


def usd_micros(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * 1_000_000 + int((frac + "000000")[:6])


def upstream_broke(req: dict[str, Any], status: int, body: bytes) -> bool:
    """A 502 because the stand-in's HTTP layer (aiohttp) dropped the connection over a request
    body it could not decode (a Content-Encoding the proxy accepts, such as raw deflate, or any on
    an unguarded route)."""
    encoded = any(n == "content-encoding" for n, _ in req["headers"])
    return encoded and status == 502 and own_error(body) == "upstream_error"


def own_error(body: bytes) -> str | None:
    """The `type` of a proxy-made error (502/503/504 are ImageRouter's envelope too)."""
    try:
        error = json.loads(body)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if error in ("upstream_error", "guard_unavailable") else None


def check_response(req: dict[str, Any], status: int | None, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    where = f"{req['method']} {req['raw_path']!r}"
    assert status is not None, f"{where}: no response started"
    names = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in headers}
    # With the stand-in and the store up, the proxy itself never answers 5xx; an upstream 5xx
    # (the stand-in's HTTP layer refusing a body it cannot decode) passes through unchanged, and
    # the stand-in dropping the connection over such a body is a 502.
    assert status < 500 or own_error(body) is None or upstream_broke(req, status, body), (
        f"{where}: {status} {body[:300]!r}"
    )
    assert status != 500 or b"Server got itself in trouble" in body, f"{where}: {status} {body[:300]!r}"
    if "x-spend-guard-scope" in names:  # the proxy's own refusal
        assert status in REFUSAL_STATUSES, f"{where}: refusal with {status}"
        assert names.get("content-type", "").startswith("application/json")
        envelope = json.loads(body)
        assert set(envelope) == {"error"} and set(envelope["error"]) == {"message", "type"}, envelope
        assert isinstance(envelope["error"]["message"], str) and isinstance(envelope["error"]["type"], str)
    target = re.sub(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*", b"", req["raw_path"]) or b"/"
    if req["method"] == "POST" and canonical_path(target) in SPENDING:
        # a spending route: refused by the guard, or forwarded under a hold (the guard's headers)
        assert "x-spend-guard-scope" in names or "x-spend-guard-policy" in names, f"{where}: unguarded {status}"
    shown = body + b"".join(n + b":" + v for n, v in headers)
    for secret in SECRETS:
        assert secret.encode() not in shown, f"{where}: a secret in the response"


@pytest.fixture
def fuzz_proxy(make_proxy, up):
    """One app for every example (hypothesis runs them all inside one fixture scope)."""
    with up.lock:
        up.credits_remaining_micros = 10**12
    return make_proxy(POLICY)


@FAKE_AND_REAL
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(req=requests())
def test_any_request_gets_a_sane_answer_and_leaves_the_ledger_exact(fuzz_proxy, up, caplog, req):
    proxy = fuzz_proxy
    rt = proxy.runtime
    caplog.set_level(logging.DEBUG)
    first_record = len(caplog.records)
    charged_before, billed_before = proxy.run(rt.store.usage, ["acct"], [])["acct"].charged_micros, up.charged_micros
    try:
        status, headers, body = proxy.run(drive, proxy.app, req)
    except RecursionError:
        # Known bug, pinned by test_deeply_nested_json_body_is_refused_not_a_500 below.
        assert req["deep"], req
        return
    check_response(req, status, headers, body)
    names = {n.lower() for n, _ in headers}
    event(f"status {status}, {'passthrough' if b'x-spend-guard-policy' not in names else 'guarded'}")
    assert not rt.flights and not rt.pending_settles, "a reservation was left open"
    assert proxy.run(rt.store.open_holds) == 0
    # The proxy charged the account exactly what the upstream billed. The one allowed difference
    # is by design: an answer that is not JSON is charged the hold (in doubt, assume the upstream billed).
    charged = proxy.run(rt.store.usage, ["acct"], [])["acct"].charged_micros - charged_before
    billed = up.charged_micros - billed_before
    content_type = dict(headers).get(b"content-type", b"")
    if charged != billed:
        opaque = not content_type.startswith(b"application/json") or upstream_broke(req, status, body)
        assert billed == 0 and opaque, (req, status, body[:200], charged, billed)
    # ... and, on image and video routes, never more than it held: the proxy priced the model the
    # upstream billed for. (The fuzz policy gives text routes no `text_rates`, so they hold the
    # fallback `text_hold_usd` whatever the model; the stand-in bills an image model named there
    # at its image price.)
    access = [json.loads(r.getMessage()) for r in caplog.records[first_record:] if r.name == "spend_guard.access"]
    if billed:
        event("billed by the upstream")
        assert access and access[-1]["hold_usd"] is not None, (req, billed, access)
        if access[-1]["route"] not in TEXT_ROUTES:
            assert billed <= usd_micros(access[-1]["hold_usd"]), (req, billed, access)
    for record in caplog.records[first_record:]:
        text = record.getMessage() + (record.exc_text or "")
        for secret in SECRETS:
            assert secret not in text, f"a secret in the log: {record.name}"


# --- policy files -----------------------------------------------------------------------------

SCHEMA_KEYS = [
    "mode",
    "upstream",
    "account",
    "guard",
    "models",
    "routes",
    "groups",
    "keys",
    "base_url",
    "timeout_s",
    "connect_timeout_s",
    "name",
    "api_key_env",
    "refresh_s",
    "models_refresh_s",
    "max_staleness_s",
    "min_remaining_usd",
    "on_store_error",
    "unknown_keys",
    "unknown_models",
    "max_body_bytes",
    "hold_ttl_s",
    "shutdown_grace_s",
    "default_hold_usd",
    "text_hold_usd",
    "max_request_usd",
    "overrides",
    "allow",
    "deny",
    "path",
    "kind",
    "enabled",
    "budgets",
    "limit_usd",
    "period",
    "key_sha256",
    "api_key_id",
    "api_key_name",
    "group",
    "<<",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "day",
            "week",
            "month",
            "lifetime",
            "enforce",
            "shadow",
            "closed",
            "open",
            "image",
            "text",
            "1.50",
            "0.000001",
            "-1",
            "1e3",
            "http://127.0.0.1:1",
            "IMAGEROUTER_API_KEY",
            SHA_A,
            "/v1/x",
            "account_only",
            "reject",
            "hold",
        ]
    ),
)
yaml_trees = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=6) | st.integers(), inner, max_size=5)
    ),
    max_leaves=25,
)
top_level = st.dictionaries(st.sampled_from(SCHEMA_KEYS[:8]) | st.text(max_size=5), yaml_trees, max_size=6)


def loads_or_policy_error(path: Path) -> None:
    """load_policy either loads a policy the guard may rely on, or raises a PolicyError an operator
    can act on; any other exception fails the test."""
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        event("refused")
        assert_operator_can_act_on(exc, path)
        return
    event("loaded")
    assert_guard_can_rely_on(policy)


def assert_operator_can_act_on(exc: PolicyError, path: Path) -> None:
    """The message lists every problem, one line each, as `<file>: <location>: <message>`."""
    assert exc.problems and str(exc) == "\n".join(exc.problems), exc.problems
    for problem in exc.problems:
        assert problem.splitlines() == [problem], problem  # one line: a log line or a terminal line
        assert problem.startswith(f"{path}: "), problem
        location, _, message = problem[len(f"{path}: ") :].partition(": ")
        assert location.strip() and message.strip(), problem


def assert_guard_can_rely_on(policy: Policy) -> None:
    """What loads is what the guard may rely on."""
    assert policy.account.refresh_s <= policy.account.max_staleness_s
    assert policy.guard.hold_ttl_s > policy.upstream.timeout_s
    assert policy.guard.max_body_bytes >= 1024
    assert policy.mode in ("enforce", "shadow")
    budgets = [b for k in policy.keys for b in k.budgets] + [b for g in policy.groups.values() for b in g.budgets]
    for budget in budgets:
        assert isinstance(budget.limit_micros, int) and budget.limit_micros >= 0, budget
        assert budget.period in (None, "day", "week", "month"), budget
    for key in policy.keys:
        assert re.fullmatch(r"[0-9a-f]{64}", key.key_sha256), key
        assert key.group is None or key.group in policy.groups, key
        assert policy.key_for(key.key_sha256) is key
    assert len({k.name for k in policy.keys}) == len(policy.keys)
    models = policy.models
    for micros in (models.default_hold_micros, models.text_hold_micros, *models.overrides.values()):
        assert isinstance(micros, int) and micros >= 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=top_level | yaml_trees)
def test_any_yaml_policy_loads_or_raises_policy_error(tmp_path, document):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))
    loads_or_policy_error(path)


BASE_POLICY = yaml.safe_load(POLICY)


def _slots(node: object) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) of a YAML tree, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield node, key
            yield from _slots(value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield node, i
            yield from _slots(value)


@st.composite
def mutated_policies(draw: st.DrawFn) -> object:
    """The fuzz policy with one to three of its values replaced, removed or joined by a sibling."""
    document = copy.deepcopy(BASE_POLICY)
    for _ in range(draw(st.integers(1, 3))):
        slots = list(_slots(document))
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            container[key] = draw(scalars | yaml_trees)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=6))] = draw(scalars)
    return document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=mutated_policies())
def test_a_mutated_policy_loads_with_its_invariants_or_raises_policy_error(tmp_path, document):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))
    loads_or_policy_error(path)


YAML_SNIPPETS = [
    "account:",
    " name: a",
    "  refresh_s: 1",
    "keys:",
    "- name: k",
    "  key_sha256: " + SHA_A,
    "  budgets:",
    "  - {limit_usd: 1, period: day}",
    "&a [1, 2]",
    "*a",
    "<<: *a",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!python/object:os.system x",
    "!!timestamp 2001-12-14",
    "!!int x",
    "!!bool maybe",
    "!!set [a]",
    "!!map [1]",
    "? [a, b]\n: 1",
    "{",
    "]",
    "'",
    '"\\x',
    "\t",
    "---",
    "...",
    "%YAML 1.1",
    "a: &x {b: *x}",
    "1" + "0" * 400,
    "1" * 5000,
    "[" * 2000,
    "{a: " * 300,
    "timeout_s: 1" + "0" * 400,
    "upstream: {timeout_s: " + "9" * 400 + "}",
    ".inf",
    ".nan",
    "- - -",
    ": :",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from(YAML_SNIPPETS) | st.text(max_size=10), max_size=8), raw=st.binary(max_size=20))
def test_any_policy_text_loads_or_raises_policy_error(tmp_path, lines, raw):
    path = tmp_path / "policy.yaml"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw)
    loads_or_policy_error(path)


# --- bugs the properties found, pinned one by one ---------------------------------------------


@FAKE_AND_REAL
def test_deeply_nested_json_body_is_refused_not_a_500(fuzz_proxy, up):
    body = b"[" * 1500 + b"]" * 1500
    req = {
        "method": "POST",
        "raw_path": b"/v1/openai/images/generations",
        "query": b"",
        "chunks": 1,
        "headers": [
            ("authorization", f"Bearer {KEY_A}"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ],
        "body": body,
    }
    status, _, answer = fuzz_proxy.run(drive, fuzz_proxy.app, req)
    assert status == 400 and json.loads(answer)["error"]["type"] == "invalid_request_error"
    assert up.generation_requests == []


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "content",
    [b'"": 1\n', b'"mode\\nguard": 1\n', b'account: {name: a, "refresh\\n_s": 1}\n'],
    ids=["empty-key", "key-with-a-newline", "nested-key-with-a-newline"],
)
def test_an_unknown_key_is_named_on_one_line_that_names_it(tmp_path, content):
    # Found by the properties above: an unknown key printed raw as the location leaves it empty
    # ("policy.yaml: : unknown key"), and a newline in it splits the problem over two lines, the
    # second looking like a problem of another section ("guard: unknown key; ...").
    path = write(tmp_path, content)
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    assert len(refused.value.problems) == 1 and "unknown key" in refused.value.problems[0]
    assert_operator_can_act_on(refused.value, path)


@pytest.mark.parametrize("content", [b"account: {name: \x80}\n", b"mode: enforce\x00\n"])
def test_a_policy_file_that_is_not_text_is_a_policy_error(tmp_path, content):
    with pytest.raises(PolicyError):
        load_policy(write(tmp_path, content))


def test_a_huge_integer_duration_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError):
        load_policy(write(tmp_path, b"upstream: {timeout_s: 1" + b"0" * 400 + b"}\n"))


@pytest.mark.parametrize(
    "content",
    [
        b"mode: !!int x\n",  # ValueError
        b"mode: !!bool maybe\n",  # KeyError
        b"mode: !!timestamp 2001-12-14 x\n",  # AttributeError
        b"mode: !!set [a]\n",  # TypeError
        b"models: {default_hold_usd: 1" + b"0" * 5000 + b"}\n",  # ValueError: int digit limit
        b"keys: " + b"[" * 3000 + b"]" * 3000 + b"\n",  # RecursionError
    ],
    ids=["int-tag", "bool-tag", "timestamp-tag", "set-tag", "5000-digits", "nested-3000"],
)
def test_any_malformed_yaml_is_a_policy_error(tmp_path, content):
    with pytest.raises(PolicyError):
        load_policy(write(tmp_path, content))
