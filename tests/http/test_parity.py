"""The guard prices the model ImageRouter's own request stack reads, or refuses (docs/refusals.md).

A differential test against the real parsers: tests/parity/app.js is an Express 4 app with
`express.json()` and multer 2.0.2 `upload.fields(...)` (busboy 1.6) laid out as ImageRouter's
server is, answering with the `model` it parsed. Every body of the corpus (tests/parity/corpus.py)
and every generated one goes through the real proxy to it; for each, either the guard refused it
with 400 (and nothing reached the upstream), or the upstream's handler ran with exactly the model
the guard priced. `.ci/run` installs Node and the npm packages; under CI this test fails, never
skips, when they are missing.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.errors import Rejected
from proxy.http.body import PriceFields, decode_content, read_price_fields
from proxy.policy.load import load_policy
from proxy.settings import Settings
from proxy.untrusted import EXCERPT_MAX_CHARS, excerpt
from tests.parity.corpus import BASE, CHEAP, DENIED, MP, SMUGGLING_CASES, Case, corpus, form, part
from tests.support.constants import KEY_A
from tests.support.policies import budget, flow, key_entry, policy_yaml

pytestmark = pytest.mark.system

PARITY_DIR = Path(__file__).parents[1] / "parity"
REQUIRED = bool(os.environ.get("CI")) or os.environ.get("SPEND_GUARD_REQUIRE_REAL") == "1"
EDITS = "/v1/openai/images/edits"
ROUTES = ["/v1/openai/images/generations", EDITS, "/v1/openai/videos/generations"]
POLICY = policy_yaml(
    account=flow(name="parity", refresh_s=3600, models_refresh_s=3600, max_staleness_s=7200),
    keys=[key_entry(budgets=[budget(1000000, None)])],
)
CORPUS = corpus()
# multer errors that depend on the route's file-field layout (`upload.fields([...])`), which the
# guard does not mirror: ImageRouter then answers 400 and runs nothing, and the guard releases
# the hold on that error body. The only outcome besides "refused" and "ran the priced model".
LAYOUT_ERRORS = frozenset({"LIMIT_UNEXPECTED_FILE", "LIMIT_FILE_COUNT"})


class Stack:
    """The running Express + multer app: its URL and a count of the requests that reached it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def posts(self) -> int:
        return int(self.http.get("/parity/posts").json()["posts"])

    def parse(
        self, body: bytes, content_type: str | None, path: str = EDITS, encoding: str | None = None
    ) -> dict[str, Any]:
        """What ImageRouter's stack makes of a body, sent to it directly."""
        headers = [(b"Content-Type", content_type.encode("latin-1"))] if content_type is not None else []
        if encoding is not None:
            headers.append((b"Content-Encoding", encoding.encode()))
        resp = self.http.post(path, content=body, headers=headers)
        data = resp.json()
        return data if data.get("parity") else {"status": resp.status_code, "error": data.get("error")}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    node = shutil.which("node")
    missing = "node is not installed" if node is None else None
    if node is not None and not (PARITY_DIR / "node_modules" / "multer" / "package.json").is_file():
        missing = f"the npm packages are not installed (npm ci --prefix {PARITY_DIR})"
    if missing:
        if REQUIRED:
            pytest.fail(f"{missing}; .ci/run installs them, and CI never skips the parity test")
        pytest.skip(missing)
    assert node is not None
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [node, "app.js"], cwd=PARITY_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the app prints its port once it listens
            if not line:
                proc.wait(10)
                errors.seek(0)
                pytest.fail(f"the parity app did not start: {errors.read().decode(errors='replace')[-2000:]}")
            running = Stack(f"http://127.0.0.1:{json.loads(line)['port']}")
            yield running
            running.http.close()
        finally:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()  # the app exits when its stdin ends
            proc.stdout.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def proxy(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path = tmp_path_factory.mktemp("parity") / "policy.yaml"
    path.write_text(POLICY)
    server = fakeredis.FakeServer()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAGEROUTER_API_KEY", "sk-parity-account")
        app = create_app(
            Settings(policy=str(path), upstream=stack.url, state_dir=str(path.parent)),  # not the real home's
            policy=load_policy(path),
            redis_factory=lambda: fakeredis.FakeAsyncRedis(server=server),
        )
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client


def verdict(body: bytes, content_type: str | None, encoding: str | None = None) -> PriceFields | Rejected:
    try:
        return read_price_fields(decode_content(body, encoding, 1 << 26, content_type), content_type)
    except Rejected as exc:
        return exc


def through_guard(
    client: TestClient,
    stack: Stack,
    caplog: pytest.LogCaptureFixture,
    case: Case,
    path: str = EDITS,
    encoding: str | None = None,
) -> str:
    """Send one body through the proxy to the stack; assert refused, or priced as the stack read it."""
    label, body, content_type = case
    headers = [(b"Authorization", f"Bearer {KEY_A}".encode())]
    if content_type is not None:
        headers.append((b"Content-Type", content_type.encode("latin-1")))
    if encoding is not None:
        headers.append((b"Content-Encoding", encoding.encode()))
    caplog.clear()
    before = stack.posts()
    resp = client.post(path, content=body, headers=headers)
    reached = stack.posts() - before
    expected = verdict(body, content_type, encoding)
    if resp.headers.get("x-spend-guard-scope") == "request":
        assert resp.status_code == 400, (label, resp.status_code, resp.text[:300])
        assert resp.json()["error"]["type"] == "invalid_request_error"
        assert reached == 0, f"{label}: refused, yet it reached the upstream"
        assert isinstance(expected, Rejected), (label, expected)
        return "refused"
    report = resp.json()
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"]
    if resp.status_code == 400 and report.get("error", {}).get("code") in LAYOUT_ERRORS:
        assert reached == 1 and isinstance(expected, PriceFields), (label, expected)
        assert access and access[-1]["cost_usd"] == "0.0000", (label, access)  # the hold was released
        return "not run"
    assert resp.status_code == 200 and report.get("parity"), (
        f"{label}: the guard forwarded a body ImageRouter's stack did not run: {resp.status_code} {resp.text[:300]}"
    )
    assert reached == 1
    assert isinstance(expected, PriceFields), (label, expected)
    assert report["model"] == expected.model, (
        f"{label}: the guard priced {expected.model!r}, ImageRouter ran {report['model']!r}"
    )
    assert access and access[-1]["model"] == excerpt(expected.model) and access[-1]["decision"] == "allowed", (
        label,
        access,
    )
    return "priced"


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_every_corpus_body_is_refused_or_priced_as_imagerouter_reads_it(proxy, stack, caplog, case):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    through_guard(proxy, stack, caplog, case)


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("case", SMUGGLING_CASES, ids=[c[0] for c in SMUGGLING_CASES])
def test_the_four_smuggling_cases_are_refused_on_every_spending_route(proxy, stack, caplog, case, path):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    assert through_guard(proxy, stack, caplog, case, path) == "refused"


def test_the_corpus_is_large_and_both_outcomes_occur(stack):
    # Not a corpus of refusals only: plenty of bodies are priced and must then match exactly.
    outcomes = [isinstance(verdict(body, ctype), PriceFields) for _, body, ctype in CORPUS]
    assert len(CORPUS) >= 300
    assert sum(outcomes) >= 60 and outcomes.count(False) >= 200
    # The stack really runs another model than the cheap one in each smuggling case (else this test
    # would prove nothing).
    ran = [stack.parse(body, ctype)["model"] for _, body, ctype in SMUGGLING_CASES]
    assert ran == [None, None, "google/veo-3.1", None, "整瑳琯獥ⅴ", "google/veo-3.1Ã©"]


def gzip_with_comment(comment: bytes, data: bytes) -> bytes:
    """A gzip member whose header carries `comment` (FCOMMENT), which multer reads as it is."""
    member = gzip.compress(data, mtime=0)
    return member[:3] + bytes([member[3] | 0x10]) + member[4:10] + comment + b"\x00" + member[10:]


JSON_BODY = b'{"model": "google/veo-3.1", "prompt": "a cat"}'
RAW_DEFLATE = zlib.compressobj(wbits=-zlib.MAX_WBITS)
SMUGGLED = gzip_with_comment(
    b"\r\n" + form(part(b'Content-Disposition: form-data; name="model"', DENIED)),
    form(part(b'Content-Disposition: form-data; name="model"', CHEAP)),
)
ENCODED: list[tuple[str, bytes, str, str]] = [
    ("gzip-json", gzip.compress(JSON_BODY), "application/json", "gzip"),
    (
        "gzip-json-two-members",
        gzip.compress(b'{"model": ') + gzip.compress(b'"google/veo-3.1"}'),
        "application/json",
        "gzip",
    ),
    ("deflate-json", zlib.compress(JSON_BODY), "application/json", "deflate"),
    ("raw-deflate-json", RAW_DEFLATE.compress(JSON_BODY) + RAW_DEFLATE.flush(), "application/json", "deflate"),
    ("x-gzip-json", gzip.compress(JSON_BODY), "application/json", "x-gzip"),
    ("br-json", JSON_BODY, "application/json", "br"),
    ("identity-json", JSON_BODY, "application/json", "identity"),
    ("gzip-multipart", gzip.compress(BASE), MP, "gzip"),
    ("gzip-multipart-comment-smuggles-a-form", SMUGGLED, MP, "gzip"),
    ("deflate-multipart", zlib.compress(BASE), MP, "deflate"),
    ("identity-multipart", BASE, MP, "identity"),
]


@pytest.mark.parametrize("case", ENCODED, ids=[c[0] for c in ENCODED])
def test_an_encoded_body_is_refused_or_priced_as_imagerouter_decodes_it(proxy, stack, caplog, case):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    label, body, content_type, encoding = case
    through_guard(proxy, stack, caplog, (label, body, content_type), encoding=encoding)


@pytest.mark.parametrize("path", ROUTES)
def test_a_file_outside_imagerouters_field_layout_runs_nothing_and_is_charged_nothing(proxy, stack, caplog, path):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    unexpected = part(b'Content-Disposition: form-data; name="document"; filename="a.pdf"', b"%PDF")
    case = ("unexpected-file", form(part(b'Content-Disposition: form-data; name="model"', DENIED), unexpected), MP)
    assert through_guard(proxy, stack, caplog, case, path) == "not run"


def test_multer_reads_an_encoded_form_raw_so_a_gzip_comment_can_smuggle_a_model(stack):
    # Why an encoded multipart body is refused: the form that decompresses names test/test, yet
    # ImageRouter's stack runs the one in the gzip header's comment.
    assert stack.parse(SMUGGLED, MP, encoding="gzip")["model"] == "google/veo-3.1"
    assert stack.parse(gzip.decompress(SMUGGLED), MP)["model"] == "test/test"


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
@pytest.mark.parametrize(
    "path", [b"/v1/openai/images/%2567enerations", b"/v1/openai/videos%252Fgenerations", b"/v1/openai/%2569mages/edits"]
)
def test_a_double_encoded_spending_path_is_refused_on_every_method(proxy, stack, method, path):
    before = stack.posts()
    body = form_body(DENIED)
    resp = proxy.request(
        method,
        path.decode(),
        content=body,
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "multipart/form-data; boundary=B"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert stack.posts() == before


def test_a_long_model_is_echoed_bounded_in_the_message_and_the_log(proxy, stack, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    model = "vendor/" + "m" * 5000
    resp = proxy.post(EDITS, json={"model": model, "prompt": "x"}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert resp.status_code == 200 and resp.json()["model"] == model  # priced (default hold) and run
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"][-1]
    assert logged["model"] == model[:EXCERPT_MAX_CHARS] + "…"


# -- generated bodies ---------------------------------------------------------------------------

NAMES = [
    b"model",
    b"model",
    b"model",
    b"prompt",
    b"image",
    b"mask",
    b"model[]",
    b"Model",
    b"seconds",
    b"model ",
    b"image[]",
]
VALUES = [CHEAP, DENIED, b"", b"a cat", "модель".encode(), b"test/test!", b"m\xe9", b"x\r\ny", b"--B", b"\r\n--B"]
DISPOSITIONS = [
    b'form-data; name="%s"',
    b"form-data; name=%s",
    b'Form-Data; NAME="%s"',
    b'form-data; name="%s"; filename="a.png"',
    b'form-data; filename="a.png"; name="%s"',
    b'form-data; name="%s"; filename=""',
    b'form-data; foo="x"; name="%s"',
    b"form-data; name*=utf-8''%s",
    b'attachment; name="%s"',
    b'form-data; name="%s";',
    b'form-data;\r\n name="%s"',
    b'form-data; name = "%s"',
    b'form-data\t; name="%s"',
]
EXTRA_HEADERS = [
    b"",
    b"",
    b"",
    b"\r\nContent-Type: text/plain",
    b"\r\nContent-Type: text/plain; charset=utf-8",
    b"\r\nContent-Type: text/plain; charset=latin1",
    b"\r\nContent-Type: text/plain; charset=utf-16le",
    b"\r\nContent-Type: application/octet-stream",
    b"\r\nContent-Transfer-Encoding: base64",
    b"\r\nContent-Transfer-Encoding: 8bit",
    b"\r\nX-Note: a\r\n b",
    b'\r\ncontent-disposition: form-data; name="model"',
    b"\r\nContent-Type: text/plain; charset=US-ASCII",
    b"\r\nContent-Type: image/png",
]
DELIMITER_TAILS = [b"\r\n"] * 8 + [b" \r\n", b"\t\r\n", b"x\r\n", b"\n", b"-\r\n", b"\r\n\r\n"]
BOUNDARIES = [b"B", b"----WebKitFormBoundaryx", b"a b", b"'()+_,-./:=?", b"b"]


def form_body(model: bytes) -> bytes:
    return b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model + b"\r\n--B--\r\n"


def mostly(common: object, *rare: object, weight: int = 6) -> st.SearchStrategy[Any]:
    """`common` most of the time, else one of `rare`: wild bodies are refused, so most stay sane."""
    return st.sampled_from([common] * weight + list(rare))


@st.composite
def multipart_bodies(draw: st.DrawFn) -> Case:
    boundary = draw(st.sampled_from(BOUNDARIES))
    body = draw(mostly(b"", b"preamble\r\n", b"X--" + boundary + b"\r\n", b"pre\n", weight=8))
    for index in range(draw(st.integers(1, 4))):
        name = b"model" if index == 0 and draw(st.booleans()) else draw(st.sampled_from(NAMES))
        disposition = draw(mostly(DISPOSITIONS[0], *DISPOSITIONS[1:], weight=20)) % name
        headers = b"Content-Disposition: " + disposition + draw(mostly(b"", *EXTRA_HEADERS, weight=10))
        if draw(st.integers(0, 19)) == 0:
            headers = draw(st.sampled_from([b"X-First: 1\r\n", b" folded\r\n"])) + headers
        value = draw(st.sampled_from(VALUES[:2] * 20 + VALUES)).replace(b"--B", b"--" + boundary)
        ending = draw(mostly(b"\r\n\r\n", b"\n\n", b"\r\n\n", weight=20))
        delimiter_tail = draw(mostly(b"\r\n", *DELIMITER_TAILS[8:], weight=40))
        body += b"--" + boundary + delimiter_tail + headers + ending + value + b"\r\n"
    body += b"--" + boundary + draw(mostly(b"--\r\n", b"--", b"-- x", b"\r\n", b"", weight=8))
    mutation = draw(mostly("none", "cut", "flip", "insert", "delete", "lf", weight=10))
    if mutation != "none" and body:
        at = draw(st.integers(0, len(body) - 1))
        if mutation == "cut":
            body = body[:at]
        elif mutation == "flip":
            body = body[:at] + bytes([draw(st.sampled_from(b"\r\n -\t\"';=:\x00\xe9"))]) + body[at + 1 :]
        elif mutation == "insert":
            inserted = draw(st.sampled_from([b"\r\n", b" ", b"--" + boundary, b"\r\n--" + boundary + b"\r\n"]))
            body = body[:at] + inserted + body[at:]
        elif mutation == "delete":
            body = body[:at] + body[at + 1 :]
        else:
            body = body.replace(b"\r\n", b"\n", 1)
    quoted = draw(st.booleans()) or any(ch in boundary for ch in b" '()+,/:=?")
    declared = ('"' + boundary.decode() + '"') if quoted else boundary.decode()
    ctype = draw(
        st.sampled_from(
            [
                "multipart/form-data; boundary=%s",
                "Multipart/Form-Data;boundary=%s",
                "multipart/form-data; charset=utf-8; boundary=%s",
            ]
        )
    )
    return "generated", body, ctype % declared


@st.composite
def json_bodies(draw: st.DrawFn) -> Case:
    keys = [b'"model"', b'"m\\u006fdel"', b'"prompt"', b'"__proto__"', b'"Model"', b'"model "']
    values = [
        b'"test/test"',
        b'"google/veo-3.1"',
        b'"google\\/veo-3.1"',
        b'"\\u0067oogle/veo-3.1"',
        b"null",
        b"3",
        b'["google/veo-3.1"]',
        b'{"model": "x"}',
        b'" test/test"',
        b'"test/test\\n"',
        b"NaN",
        b'"\\ud800"',
    ]
    pairs = draw(
        st.lists(
            st.tuples(mostly(keys[0], *keys[1:], weight=4), mostly(values[0], *values[1:], weight=4)),
            min_size=1,
            max_size=4,
        )
    )
    text = b"{" + b", ".join(k + b": " + v for k, v in pairs) + b"}"
    text = draw(mostly(b"", b"\xef\xbb\xbf", b" \r\n", b"\xef\xbb\xbf\xef\xbb\xbf")) + text
    text += draw(mostly(b"", b"\n", b" x", b","))
    ctype = draw(
        st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "application/json; charset=UTF-8",
                "Application/JSON",
                "application/json; charset=latin1",
                "application/json;charset=utf-8",
            ]
        )
    )
    return "generated-json", text, ctype


@st.composite
def sane_multipart_bodies(draw: st.DrawFn) -> Case:
    """A well-formed form with a model, in any order among other fields, its parts spelled in
    any of the ways every parser agrees on (the guard must price these, not refuse them)."""
    boundary = draw(st.sampled_from([b"B", b"----WebKitFormBoundaryx", b"x-y.z_0"]))
    names = draw(st.permutations([b"model", b"prompt", b"image", b"quality"]).map(lambda p: p[: 1 + p.index(b"model")]))
    body = draw(st.sampled_from([b"", b"preamble\r\n", b"\r\n"]))
    for name in names:
        disposition = draw(
            st.sampled_from(
                [
                    b'form-data; name="%s"',
                    b"form-data; name=%s",
                    b'FORM-DATA; Name="%s"',
                    b'form-data;name="%s"',
                    b'form-data; x="y;z"; name="%s"',
                    b'form-data; name="%s"  ',
                ]
            )
        )
        if name == b"image":
            disposition += b'; filename="a.png"'
        extra = draw(
            st.sampled_from(
                [
                    b"",
                    b"\r\nContent-Type: text/plain",
                    b"\r\ncontent-type: text/plain; charset=UTF-8",
                    b"\r\nX-Note: x",
                    b"\r\nContent-Transfer-Encoding: 8bit",
                    b"\r\nContent-Type: text/plain;charset=us-ascii",
                ]
            )
        )
        value = draw(st.sampled_from([CHEAP, DENIED, b"openai/gpt-image-1", "модель".encode(), b"a b", b"x" * 300]))
        body += b"--" + boundary + b"\r\n" + draw(st.sampled_from([b"Content-Disposition: ", b"content-disposition:"]))
        body += disposition % name + extra + b"\r\n\r\n" + value + b"\r\n"
    body += b"--" + boundary + draw(st.sampled_from([b"--\r\n", b"--", b"--\r\nepilogue"]))
    declared = draw(st.sampled_from([boundary.decode(), '"' + boundary.decode() + '"']))
    ctype = draw(st.sampled_from(["multipart/form-data; boundary=", "multipart/form-data;boundary="]))
    return "generated-sane", body, ctype + declared


GENERATED = st.one_of(sane_multipart_bodies(), multipart_bodies(), multipart_bodies(), json_bodies())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=GENERATED)
def test_generated_bodies_are_read_alike_by_the_guard_and_imagerouters_stack(stack, case):
    _, body, content_type = case
    expected = verdict(body, content_type)
    if isinstance(expected, PriceFields):
        read = stack.parse(body, content_type)
        if read.get("status") == 400 and read["error"].get("code") in LAYOUT_ERRORS:
            return  # ImageRouter runs nothing (see LAYOUT_ERRORS)
        assert read == {"parity": True, "body": "object", "model": expected.model, "model_type": "string", "cost": 0}, (
            body,
            content_type,
        )


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=GENERATED)
def test_generated_bodies_through_the_guard(proxy, stack, caplog, case):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    through_guard(proxy, stack, caplog, case)
