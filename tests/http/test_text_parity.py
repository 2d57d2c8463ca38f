"""The text fields a hold rests on are read as ImageRouter reads them: a differential test
against Node itself. express.json() parses a body with `JSON.parse`, and Node turns a value into a
number with `Number()`. For every generated body, what Node makes of `max_tokens`,
`max_completion_tokens`, `max_output_tokens`, `n` and the reasoning budgets, put through the
guard's documented rule (docs/text-holds.md: a positive finite number, rounded up; not a number:
refused), must be what `read_price_fields` read."""

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

from proxy.errors import Rejected
from proxy.http.body import read_price_fields
from proxy.http.numbers import JS_WHITESPACE, js_number

pytestmark = pytest.mark.system

REQUIRED = bool(os.environ.get("CI")) or os.environ.get("SPEND_GUARD_REQUIRE_REAL") == "1"
FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "thinking.budget_tokens",
    "reasoning.max_tokens",
)
# One line of base64 in, one line of JSON out. A body: each field's `String(Number(value))`, or
# null where the body lacks it. A string (`s:` before the base64): `String(Number(string))`.
NODE = r"""
const readline = require('readline');
const fields = FIELDS_JSON.map((f) => f.split('.'));
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  let out;
  try {
    if (line.startsWith('s:')) {
      out = String(Number(Buffer.from(line.slice(2), 'base64').toString('utf8')));
    } else {
      const body = JSON.parse(Buffer.from(line, 'base64').toString('utf8'));
      out = fields.map((path) => {
        let v = body;
        for (const name of path) v = v !== null && typeof v === 'object' && !Array.isArray(v) ? v[name] : undefined;
        if (v === undefined || v === null) return null;
        try { return String(Number(v)); } catch (e) { return 'TypeError'; }
      });
    }
  } catch (e) {
    out = 'error';
  }
  process.stdout.write(JSON.stringify(out) + '\n');
});
""".replace("FIELDS_JSON", json.dumps(list(FIELDS)))


class JsonParse:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def ask(self, line: bytes) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def fields(self, body: bytes) -> Any:
        return self.ask(base64.b64encode(body))

    def number(self, text: str) -> str:
        return self.ask(b"s:" + base64.b64encode(text.encode("utf-8", "surrogatepass")))


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


REFUSED = "refused"


def rule(name: str, number: str | None) -> int | str | None:
    """The guard's documented rule applied to what Number() made of a field (None: absent)."""
    if number is None:
        return None
    value = math.nan if number in ("NaN", "TypeError") else float(number.replace("Infinity", "inf"))
    if math.isnan(value) or (name == "n" and value == math.inf):
        return REFUSED
    return math.ceil(value) if math.isfinite(value) and value > 0 else None


def guard_reads(body: bytes) -> list[int | None] | str:
    try:
        fields = read_price_fields(body, "application/json", text=True)
    except Rejected as exc:
        assert exc.status == 400 and "send a JSON number" in exc.message, exc.message
        return REFUSED
    return [
        fields.max_tokens,
        fields.max_completion_tokens,
        fields.max_output_tokens,
        fields.n,
        fields.reasoning_tokens,
    ]


KEYS = [
    b'"max_tokens"',
    b'"max_completion_tokens"',
    b'"max_output_tokens"',
    b'"n"',
    b'"m\\u0061x_tokens"',
    b'"\\u006e"',
    b'"max_output_token\\u0073"',
    b'"max_tokens "',
    b'"N"',
    b'"__proto__"',
    b'"prompt"',
]
VALUES = [
    b"100",
    b"100.0",
    b"1e2",
    b"1E+2",
    b"-0",
    b"0",
    b"0.5",
    b"2.5",
    b"-3",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"9007199254740993",
    b"123456789012345678901234567890",
    b"1e21",
    b"true",
    b"false",
    b"null",
    b'"3"',
    b'" 4 "',
    b'"1e2"',
    b'"\\u0033"',
    b"[1]",
    b'""',
    b'"0x10"',
    b'"0X1f"',
    b'"0o17"',
    b'"0b101"',
    b'" 12 "',
    b'"1e3"',
    b'"+.5"',
    b'"5."',
    b'"Infinity"',
    b'"-Infinity"',
    b'"\\u00a0\\u2028 7 \\ufeff"',
    b"[]",
    b"[[]]",
    b'[" 7 "]',
    b"[null]",
    b'["0x10"]',
    b"[[2]]",
]
# Values Number() makes NaN of: a body holding one is refused, whatever else it holds.
NAN_VALUES = [
    b'"x"',
    b'"-0x10"',
    b'"1_000"',
    b'"inf"',
    b'"\\u180e5"',
    b'"\\u00855"',
    b'"\\u0663"',
    b"[1, 2]",
    b"[true]",
    b"{}",
    b'{"n": 2}',
    b'{"valueOf": 1, "toString": 2}',
]
BUDGETS = [b'"thinking"', b'"reasoning"']
BUDGET_KEYS = {b'"thinking"': b'"budget_tokens"', b'"reasoning"': b'"max_tokens"'}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    values = (
        st.sampled_from(VALUES) | st.sampled_from(NAN_VALUES)
        if draw(st.integers(0, 4)) == 0
        else st.sampled_from(VALUES)
    )
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=6))
    for outer in draw(st.lists(st.sampled_from(BUDGETS), max_size=2)):
        pairs.append((outer, b"{" + BUDGET_KEYS[outer] + b": " + draw(values) + b"}"))
    return b'{"model": "m", ' + b", ".join(k + b": " + v for k, v in pairs) + b"}"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies())
def test_text_fields_are_read_as_node_reads_them(node, body):
    parsed = node.fields(body)
    assert parsed != "error", body
    ruled = [rule(name, number) for name, number in zip(FIELDS, parsed, strict=True)]
    budgets = [count for count in ruled[4:] if count is not None]
    expected = REFUSED if REFUSED in ruled else [*ruled[:4], max(budgets) if budgets else None]
    assert guard_reads(body) == expected, (body, parsed)


# Everything JavaScript might read differently: signs, radix prefixes, exponents, `Infinity`,
# separators, and whitespace of both languages (JavaScript's Zs and line terminators; Python's
# extra U+001C-U+001F and U+0085; U+180E, whitespace in old Unicode).
ALPHABET = "0123456789+-.eExXoObBaAfF_,Iinfty " + JS_WHITESPACE + "\x1c\x1f\x85\u180e\u0663\uff11"


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(ALPHABET, max_size=8)
    | st.sampled_from(
        ["Infinity", "-Infinity", "+Infinity", " 0x1F ", "1e309", "0x" + "f" * 300, "-0", "00012", "1.e5"]
    )
)
def test_a_string_is_read_as_number_reads_it(node, text):
    expected = node.number(text)
    got = js_number(text)
    assert (str(got) if math.isnan(got) else got) == (
        "nan" if expected == "NaN" else float(expected.replace("Infinity", "inf"))
    ), (text, expected)


def test_the_differential_sees_node_not_python(node):
    # Cases where a naive reader differs: the last duplicate wins, escaped keys are the same key,
    # a literal past 2^53 is the double JSON.parse makes of it, Number() reads hex and trims.
    assert node.fields(b'{"max_tokens": 5, "m\\u0061x_tokens": 9007199254740993, "n": "0x10"}')[:4] == [
        "9007199254740992",
        None,
        None,
        "16",
    ]
    fields = read_price_fields(
        b'{"model": "m", "max_tokens": 5, "m\\u0061x_tokens": 9007199254740993, "n": "0x10"}',
        "application/json",
        text=True,
    )
    assert (fields.max_tokens, fields.n) == (9007199254740992, 16)
    assert [node.number(t) for t in (" 12 ", "", "1e3", "\x1c5", "\u180e5")] == ["12", "0", "1000", "NaN", "NaN"]
