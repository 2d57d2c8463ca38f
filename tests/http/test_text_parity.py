"""The text fields a hold rests on are read as ImageRouter's `express.json()` reads them
(docs/text-holds.md): a differential test against the real `JSON.parse` of Node, which body-parser runs. For every
generated body, what Node's parse yields for `max_tokens`, `max_completion_tokens`,
`max_output_tokens` and `n`, put through the guard's documented rule (a positive finite number,
rounded up; `n` also from a numeric string), must be what `read_price_fields` read."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http.body import read_price_fields

pytestmark = pytest.mark.system

REQUIRED = bool(os.environ.get("CI")) or os.environ.get("SPEND_GUARD_REQUIRE_REAL") == "1"
FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n")
# One body per line (base64) in, one line of JSON out: each field's typeof and its value as text.
NODE = r"""
const readline = require('readline');
const fields = FIELDS_JSON;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  let out;
  try {
    const body = JSON.parse(Buffer.from(line, 'base64').toString('utf8'));
    out = fields.map((f) => {
      const v = body[f];
      return [typeof v, typeof v === 'number' || typeof v === 'string' ? String(v) : null];
    });
  } catch (e) {
    out = 'error';
  }
  process.stdout.write(JSON.stringify(out) + '\n');
});
""".replace("FIELDS_JSON", json.dumps(list(FIELDS)))


class JsonParse:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def fields(self, body: bytes) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(base64.b64encode(body) + b"\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


@pytest.fixture(scope="module")
def node() -> Iterator[JsonParse]:
    binary = shutil.which("node")
    if binary is None:
        if REQUIRED:
            pytest.fail("node is not installed; .ci/run installs it, and CI never skips the parity tests")
        pytest.skip("node is not installed")
    proc = subprocess.Popen([binary, "-e", NODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield JsonParse(proc)
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()
        proc.wait(10)


def count(kind: str, text: str | None, *, strings: bool = False) -> int | None:
    """The guard's rule applied to what JSON.parse yielded."""
    if kind == "number" or (strings and kind == "string"):
        assert text is not None
        try:
            number = float(text.strip())
        except ValueError:
            return None
        return math.ceil(number) if math.isfinite(number) and number > 0 else None
    return None


KEYS = [b'"max_tokens"', b'"max_completion_tokens"', b'"max_output_tokens"', b'"n"', b'"m\\u0061x_tokens"',
        b'"\\u006e"', b'"max_output_token\\u0073"', b'"max_tokens "', b'"N"', b'"__proto__"', b'"prompt"']
VALUES = [b"100", b"100.0", b"1e2", b"1E+2", b"-0", b"0", b"0.5", b"2.5", b"-3", b"1e400", b"-1e400", b"1e-400",
          b"9007199254740993", b"123456789012345678901234567890", b"1e21", b"true", b"false", b"null", b'"3"',
          b'" 4 "', b'"x"', b'"1e2"', b'"\\u0033"', b"[1]", b'{"n": 2}', b'{"max_tokens": 7}', b'""']


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), min_size=1, max_size=6))
    return b'{"model": "m", ' + b", ".join(k + b": " + v for k, v in pairs) + b"}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies())
def test_text_fields_are_read_as_json_parse_reads_them(node, body):
    parsed = node.fields(body)
    fields = read_price_fields(body, "application/json", text=True)
    assert parsed != "error", body
    expected = [count(kind, text, strings=name == "n") for name, (kind, text) in zip(FIELDS, parsed, strict=True)]
    assert [fields.max_tokens, fields.max_completion_tokens, fields.max_output_tokens, fields.n] == expected, (
        body, parsed)


def test_the_differential_sees_json_parse_not_python(node):
    # Cases where a naive reader differs: the last duplicate wins, escaped keys are the same key,
    # a literal past 2^53 is the double JSON.parse makes of it.
    assert node.fields(b'{"max_tokens": 5, "m\\u0061x_tokens": 9007199254740993, "n": 1e400}') == [
        ["number", "9007199254740992"], ["undefined", None], ["undefined", None], ["number", "Infinity"]
    ]
    fields = read_price_fields(b'{"model": "m", "max_tokens": 5, "m\\u0061x_tokens": 9007199254740993, "n": 1e400}',
                               "application/json", text=True)
    assert (fields.max_tokens, fields.n) == (9007199254740992, None)
