"""Bodies for the differential test (tests/http/test_parity.py): the four smuggling cases and every
mutation of them we could think of. Each case is (id, body, Content-Type or None)."""

from __future__ import annotations

import json
from collections.abc import Iterator

Case = tuple[str, bytes, "str | None"]

CHEAP = b"test/test"
DENIED = b"google/veo-3.1"
MP = "multipart/form-data; boundary=B"


def cd(name: bytes, extra: bytes = b"") -> bytes:
    return b'Content-Disposition: form-data; name="' + name + b'"' + extra


def part(headers: bytes, value: bytes, boundary: bytes = b"B") -> bytes:
    return b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + value + b"\r\n"


def form(*parts: bytes, boundary: bytes = b"B", preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    return preamble + b"".join(parts) + b"--" + boundary + b"--" + epilogue


PROMPT = part(cd(b"prompt"), b"a cat")
MODEL = part(cd(b"model"), DENIED)
IMAGE = part(cd(b"image", b'; filename="a.png"') + b"\r\nContent-Type: image/png", b"\x89PNG\r\n\x1a\n\x00\x00")
BASE = form(PROMPT, MODEL)

# The four smuggling cases: bodies a line-by-line multipart reader priced as test/test while
# ImageRouter's parsers (multer over busboy) ran another model, or none.
SMUGGLING_CASES: list[Case] = [
    # 1. a delimiter mid-line in the preamble: the "part" priced does not exist for busboy
    ("smuggling-delimiter-mid-line", b"X--B\r\n" + cd(b"model") + b"\r\n\r\n" + CHEAP + b"\r\n" + form(PROMPT), MP),
    # 2. bytes after a delimiter: busboy drops what follows up to the next delimiter
    (
        "smuggling-junk-after-delimiter",
        form(PROMPT, b"--B junk\r\n" + cd(b"model") + b"\r\n\r\n" + CHEAP + b"\r\n"),
        MP,
    ),
    # 3. folded part headers: busboy reads the continuation, a line reader does not
    (
        "smuggling-folded-header",
        form(part(b'Content-Disposition: form-data\r\n ; name="model"', DENIED), part(cd(b"model "), CHEAP)),
        MP,
    ),
    (
        "smuggling-folded-into-content-type",
        form(part(b"Content-Type: text/plain\r\n " + cd(b"model"), CHEAP), PROMPT),
        MP,
    ),
    # 4. a per-part charset: busboy decodes by it
    (
        "smuggling-charset-utf16le",
        form(part(cd(b"model") + b"\r\nContent-Type: text/plain; charset=utf-16le", b"test/test!"), PROMPT),
        MP,
    ),
    (
        "smuggling-charset-latin1",
        form(part(cd(b"model") + b"\r\nContent-Type: text/plain; charset=latin1", DENIED + b"\xc3\xa9")),
        MP,
    ),
]


def _boundaries() -> Iterator[Case]:
    for boundary, declared in [
        (b"B", "B"),
        (b"B", '"B"'),
        (b"a b", '"a b"'),
        (b"'()+_,-./:=?", '"\'()+_,-./:=?"'),
        (b"x" * 70, "x" * 70),
        (b"x" * 71, "x" * 71),
        (b"B ", '"B "'),
        (b'a"b', '"a\\"b"'),
        (b"a\\b", '"a\\\\b"'),
        (b"----WebKitFormBoundary7MA4YWxkTrZu0gW", "----WebKitFormBoundary7MA4YWxkTrZu0gW"),
        (b"B", "b"),
        (b"\xe9", '"\xe9"'),
        (b"B;", '"B;"'),
        (b"", '""'),
    ]:
        body = form(part(cd(b"prompt"), b"x", boundary), part(cd(b"model"), DENIED, boundary), boundary=boundary)
        yield f"boundary-{declared!r}", body, "multipart/form-data; boundary=" + declared
    for ctype in [
        "multipart/form-data; charset=utf-8; boundary=B",
        "Multipart/Form-Data; BOUNDARY=B",
        "multipart/form-data ; boundary=B",
        "multipart/form-data;boundary=B",
        "multipart/form-data;  boundary=B  ",
        "multipart/form-data;\tboundary=B",
        "multipart/form-data; boundary =B",
        "multipart/form-data; boundary= B",
        "multipart/form-data; boundary=B; boundary=C",
        "multipart/form-data; boundary=C; boundary=B",
        "multipart/form-data; boundary=B;",
        "multipart/form-data",
        "multipart/mixed; boundary=B",
        "multipart/form-data; boundary=B, text/plain",
        "multipart/form-data; boundary*=utf-8''B",
        "multipart/form-data; xboundary=C; boundary=B",
        'multipart/form-data; note="boundary=C"; boundary=B',
        "multipart/form-data boundary=B",
        "multipart/; boundary=B",
        "text/plain; boundary=B",
        "multipart/form-data; boundary=b",
    ]:
        yield f"content-type-{ctype!r}", BASE, ctype


def _line_endings() -> Iterator[Case]:
    yield "lf-everywhere", BASE.replace(b"\r\n", b"\n"), MP
    yield "cr-everywhere", BASE.replace(b"\r\n", b"\r"), MP
    yield (
        "lf-before-model-delimiter",
        BASE.replace(
            b'\r\n--B\r\nContent-Disposition: form-data; name="model"',
            b'\n--B\r\nContent-Disposition: form-data; name="model"',
        ),
        MP,
    )
    yield (
        "lf-after-model-delimiter",
        BASE.replace(
            b'--B\r\nContent-Disposition: form-data; name="model"', b'--B\nContent-Disposition: form-data; name="model"'
        ),
        MP,
    )
    yield "lf-header-end", BASE.replace(b'name="model"\r\n\r\n', b'name="model"\n\n'), MP
    yield "crlf-lf-header-end", BASE.replace(b'name="model"\r\n\r\n', b'name="model"\r\n\n'), MP
    yield "lf-before-close", BASE.replace(b"\r\n--B--", b"\n--B--"), MP
    yield "cr-inside-header", BASE.replace(b'form-data; name="model"', b'form-data;\r name="model"'), MP
    yield "lf-inside-header", BASE.replace(b'form-data; name="model"', b'form-data;\n name="model"'), MP
    yield "crlf-in-value", form(part(cd(b"model"), b"a\r\nb")), MP
    yield "double-crlf-before-delimiter", form(part(cd(b"model"), DENIED + b"\r\n")), MP
    yield "leading-crlf", b"\r\n" + BASE, MP
    yield "leading-lf", b"\n" + BASE, MP
    yield "no-epilogue-crlf", form(PROMPT, MODEL, epilogue=b""), MP
    for pad in [b" ", b"\t", b"  \t", b" x"]:
        yield (
            f"transport-padding-{pad!r}",
            BASE.replace(
                b'--B\r\nContent-Disposition: form-data; name="model"',
                b"--B" + pad + b'\r\nContent-Disposition: form-data; name="model"',
            ),
            MP,
        )
        yield (
            f"padding-on-first-{pad!r}",
            form(part(cd(b"model"), CHEAP)).replace(b"--B\r\n", b"--B" + pad + b"\r\n", 1),
            MP,
        )
    for junk in [b"-", b"-x", b"x", b"\r", b"\rX", b"B", b"--"]:
        yield (
            f"junk-after-delimiter-{junk!r}",
            form(PROMPT, b"--B" + junk + b"\r\n" + cd(b"model") + b"\r\n\r\n" + CHEAP + b"\r\n"),
            MP,
        )


def _headers() -> Iterator[Case]:
    variants = {
        "lower": b'content-disposition: form-data; name="model"',
        "upper": b'CONTENT-DISPOSITION: FORM-DATA; NAME="model"',
        "no-space": b'Content-Disposition:form-data;name="model"',
        "tabs": b'Content-Disposition:\tform-data;\tname="model"',
        "unquoted": b"Content-Disposition: form-data; name=model",
        "single-quotes": b"Content-Disposition: form-data; name='model'",
        "trailing-space": b'Content-Disposition: form-data; name="model"  ',
        "trailing-semicolon": b'Content-Disposition: form-data; name="model";',
        "space-before-colon": b'Content-Disposition : form-data; name="model"',
        "space-around-equals": b'Content-Disposition: form-data; name = "model"',
        "extra-param-first": b'Content-Disposition: form-data; foo="bar"; name="model"',
        "extra-param-quoted-semicolon": b'Content-Disposition: form-data; foo="; name=prompt"; name="model"',
        "name-twice": b'Content-Disposition: form-data; name="model"; name="prompt"',
        "name-twice-other-order": b'Content-Disposition: form-data; name="prompt"; name="model"',
        "escaped-quote": b'Content-Disposition: form-data; name="mo\\"del"',
        "escaped-letter": b'Content-Disposition: form-data; name="mod\\el"',
        "escaped-backslash": b'Content-Disposition: form-data; name="model\\\\"',
        "unterminated": b'Content-Disposition: form-data; name="model',
        "rfc2231": b"Content-Disposition: form-data; name*=utf-8''model",
        "rfc2231-encoded": b"Content-Disposition: form-data; name*=UTF-8''%6Dodel",
        "rfc2231-and-plain": b"Content-Disposition: form-data; name=\"prompt\"; name*=utf-8''model",
        "rfc2231-bad-charset": b"Content-Disposition: form-data; name=\"model\"; x*=bogus''y",
        "filename": b'Content-Disposition: form-data; name="model"; filename="m.txt"',
        "filename-empty": b'Content-Disposition: form-data; name="model"; filename=""',
        "filename-star": b"Content-Disposition: form-data; name=\"model\"; filename*=utf-8''m.txt",
        "attachment": b'Content-Disposition: attachment; name="model"',
        "no-type": b'Content-Disposition: ; name="model"',
        "form-data-quoted": b'Content-Disposition: "form-data"; name="model"',
        "brackets": b'Content-Disposition: form-data; name="model[]"',
        "brackets-index": b'Content-Disposition: form-data; name="model[0]"',
        "brackets-key": b'Content-Disposition: form-data; name="model[x]"',
        "brackets-open": b'Content-Disposition: form-data; name="model["',
        "brackets-first": b'Content-Disposition: form-data; name="[model]"',
        "capital": b'Content-Disposition: form-data; name="Model"',
        "nul": b'Content-Disposition: form-data; name="model\x00"',
        "latin1-name": b'Content-Disposition: form-data; name="mod\xe9l"',
        "del-char": b'Content-Disposition: form-data; name="model"\x7f',
        "no-colon": b'Content-Disposition form-data; name="model"',
        "empty-name": b'Content-Disposition: form-data; name=""',
        "no-name": b"Content-Disposition: form-data",
        "dup-header": b'Content-Disposition: form-data; name="prompt"\r\nContent-Disposition: form-data; name="model"',
        "dup-header-reversed": (
            b'Content-Disposition: form-data; name="model"\r\nContent-Disposition: form-data; name="prompt"'
        ),
        "other-header-first": b'X-Note: hi\r\nContent-Disposition: form-data; name="model"',
        "folded-other": b'X-Note: hi\r\n there\r\nContent-Disposition: form-data; name="model"',
        "folded-tab": b'Content-Disposition: form-data;\r\n\tname="model"',
        "no-disposition": b"Content-Type: text/plain",
        "empty-header-value": b'X-Empty:\r\nContent-Disposition: form-data; name="model"',
        "long-header": b"X-Long: " + b"a" * 17000 + b'\r\nContent-Disposition: form-data; name="model"',
        "many-headers": b"X: y\r\n" * 2100 + b'Content-Disposition: form-data; name="model"',
    }
    for label, headers in variants.items():
        yield f"header-{label}", form(PROMPT, part(headers, DENIED)), MP
        yield f"header-{label}-beside-model", form(part(headers, DENIED), part(cd(b"model"), CHEAP)), MP
    yield "no-headers", form(PROMPT, b"--B\r\n\r\n" + CHEAP + b"\r\n", MODEL), MP
    yield (
        "headers-cross-delimiter",
        form(PROMPT, b"--B\r\n" + cd(b"model") + b"\r\n--B\r\n" + cd(b"model") + b"\r\n\r\n" + CHEAP + b"\r\n"),
        MP,
    )


def _charsets() -> Iterator[Case]:
    values = {
        "utf-8": DENIED,
        "UTF-8": DENIED,
        "utf8": DENIED,
        "us-ascii": DENIED,
        "ascii": DENIED,
        '"utf-8"': DENIED,
        "us-ascii-high": "mod\xe9le".encode("latin-1"),
        "latin1": "modèle".encode("latin-1"),
        "iso-8859-1": DENIED + b"\xe9",
        "windows-1252": b"\x93test/test\x94",
        "utf-16le": "google/veo-3.1".encode("utf-16le"),
        "utf16le": b"test/test!",
        "ucs2": b"test/test!",
        "base64": b"test",
        "utf-16be": "test".encode("utf-16-be"),
        "shift_jis": b"test/test",
        "bogus": DENIED,
        '" utf-8"': DENIED,
        "utf-7": b"test+AC8-test",
    }
    for charset, value in values.items():
        label = charset.split("-high")[0]
        if charset == "us-ascii-high":
            label = "us-ascii"
        headers = cd(b"model") + b"\r\nContent-Type: text/plain; charset=" + label.encode()
        yield f"charset-{charset}", form(PROMPT, part(headers, value)), MP
    for ctype in [
        b"application/json",
        b"application/octet-stream",
        b"Application/Octet-Stream",
        b"text/plain; charset",
        b"text/plain;charset=utf-8",
        b"text",
        b"text/plain; charset=utf-8; charset=latin1",
        b"multipart/mixed; boundary=C",
        b"text/plain; charset*=utf-8''latin1",
    ]:
        yield f"part-type-{ctype!r}", form(PROMPT, part(cd(b"model") + b"\r\nContent-Type: " + ctype, DENIED)), MP
    yield "utf8-invalid", form(part(cd(b"model"), b"test/\xfftest")), MP
    yield "utf8-non-ascii", form(part(cd(b"model"), "модель/test".encode())), MP
    yield "utf8-bom", form(part(cd(b"model"), b"\xef\xbb\xbf" + DENIED)), MP
    yield (
        "charset-on-prompt-only",
        form(part(cd(b"prompt") + b"\r\nContent-Type: text/plain; charset=utf-16le", b"x\x00"), MODEL),
        MP,
    )


def _encodings() -> Iterator[Case]:
    for cte, value in [
        (b"base64", b"Z29vZ2xlL3Zlby0zLjE="),
        (b"quoted-printable", b"google/veo=2D3.1"),
        (b"7bit", DENIED),
        (b"8bit", DENIED),
        (b"binary", DENIED),
        (b"Binary", DENIED),
        (b"x-token", DENIED),
        (b"base64", b"dGVzdC90ZXN0"),
    ]:
        yield (
            f"cte-{cte!r}-{value[:6]!r}",
            form(PROMPT, part(cd(b"model") + b"\r\nContent-Transfer-Encoding: " + cte, value)),
            MP,
        )
    yield (
        "cte-on-image",
        form(part(cd(b"image", b'; filename="a.png"') + b"\r\nContent-Transfer-Encoding: base64", b"iVBORw0K"), MODEL),
        MP,
    )


def _structure() -> Iterator[Case]:
    yield "base", BASE, MP
    yield "model-first", form(MODEL, PROMPT), MP
    yield "model-only", form(MODEL), MP
    yield "with-image", form(PROMPT, IMAGE, MODEL), MP
    yield "image-then-model", form(IMAGE, MODEL), MP
    yield (
        "image-array",
        form(
            part(cd(b"image[]", b'; filename="a.png"'), b"png"),
            part(cd(b"image[]", b'; filename="b.png"'), b"png"),
            MODEL,
        ),
        MP,
    )
    yield "mask", form(part(cd(b"mask", b'; filename="m.png"'), b"png"), MODEL), MP
    yield "file-named-model-only", form(PROMPT, part(cd(b"model", b'; filename="m.txt"'), DENIED)), MP
    yield (
        "octet-stream-model-beside-model",
        form(part(cd(b"model") + b"\r\nContent-Type: application/octet-stream", DENIED), part(cd(b"model"), CHEAP)),
        MP,
    )
    yield "model-twice", form(part(cd(b"model"), CHEAP), MODEL), MP
    yield "model-and-brackets", form(part(cd(b"model"), CHEAP), part(cd(b"model[]"), DENIED)), MP
    yield "empty-model", form(part(cd(b"model"), b"")), MP
    yield "space-model", form(part(cd(b"model"), b" " + DENIED)), MP
    yield "model-with-space-inside", form(part(cd(b"model"), b"test test")), MP
    yield "long-model", form(part(cd(b"model"), b"m" * 5000)), MP
    yield "empty-body", b"", MP
    yield "close-only", b"--B--\r\n", MP
    yield "no-model", form(PROMPT), MP
    yield "unclosed", BASE[: -len(b"--B--\r\n")], MP
    yield "close-no-dashes-crlf", BASE.replace(b"--B--\r\n", b"--B--"), MP
    yield "close-then-junk", BASE.replace(b"--B--\r\n", b"--B-- trailing"), MP
    yield "epilogue-part", BASE + part(cd(b"model"), CHEAP) + b"--B--\r\n", MP
    yield "epilogue-text", BASE + b"the end\r\n", MP
    yield "empty-part-value", form(part(cd(b"prompt"), b""), MODEL), MP
    yield "part-without-disposition", form(part(b"X-Note: 1", CHEAP), MODEL), MP
    yield "part-without-disposition-only", form(part(b"X-Note: 1", CHEAP)), MP
    yield "value-contains-boundary-midline", form(part(cd(b"prompt"), b"see --B here"), MODEL), MP
    yield "value-contains-boundary-prefix", form(part(cd(b"prompt"), b"x\r\n--Bx"), MODEL), MP
    yield "value-contains-dashes", form(part(cd(b"prompt"), b"--\r\n-- B --"), MODEL), MP
    nested = form(part(cd(b"model"), CHEAP, b"C"), boundary=b"C")
    yield (
        "nested-multipart-field",
        form(part(cd(b"prompt") + b"\r\nContent-Type: multipart/mixed; boundary=C", nested), MODEL),
        MP,
    )
    yield (
        "nested-multipart-model",
        form(part(cd(b"model") + b"\r\nContent-Type: multipart/mixed; boundary=C", nested)),
        MP,
    )
    yield (
        "nested-in-file",
        form(
            part(cd(b"image", b'; filename="x"') + b"\r\nContent-Type: multipart/form-data; boundary=C", nested), MODEL
        ),
        MP,
    )
    yield "nested-outer-boundary-inside", form(part(cd(b"prompt"), form(part(cd(b"model"), CHEAP)))), MP
    for size in (1_000, 100_000, 2_000_000):
        yield f"preamble-{size}", form(PROMPT, MODEL, preamble=b"p" * size + b"\r\n"), MP
    yield "preamble-decoy-boundary", form(part(cd(b"model"), CHEAP, b"D"), boundary=b"D") + BASE, MP
    yield "preamble-mid-line-delimiter", b"preamble --B\r\n" + cd(b"model") + b"\r\n\r\n" + CHEAP + b"\r\n" + BASE, MP
    yield (
        "preamble-lf-delimiter",
        (b"preamble\n--B\r\n" + cd(b"model") + b"\r\n\r\n" + CHEAP + b"\r\n" + form(PROMPT)),
        MP,
    )
    yield "preamble-crlf", b"preamble\r\n" + BASE, MP
    yield "big-field", form(part(cd(b"prompt"), b"x" * 1_100_000), MODEL), MP
    yield "big-model", form(part(cd(b"model"), b"m" * (1024 * 1024))), MP
    yield "many-parts", form(*[part(cd(b"p%d" % i), b"v") for i in range(300)], MODEL), MP


def _truncations() -> Iterator[Case]:
    full = form(PROMPT, IMAGE, MODEL)
    for cut in sorted({*range(0, len(full), 9), len(full) - 1, len(full) - 2, len(full) - 3}):
        yield f"truncated-at-{cut}", full[:cut], MP


def _json() -> Iterator[Case]:
    aj = "application/json"
    bodies = {
        "plain": b'{"model": "google/veo-3.1", "prompt": "a cat"}',
        "duplicate-last-wins": b'{"model": "test/test", "model": "google/veo-3.1"}',
        "duplicate-escaped-key": b'{"model": "test/test", "m\\u006fdel": "google/veo-3.1"}',
        "escaped-value": b'{"model": "google\\/veo-3.1"}',
        "unicode-escape-value": b'{"model": "\\u0067oogle/veo-3.1"}',
        "bom": b'\xef\xbb\xbf{"model": "google/veo-3.1"}',
        "double-bom": b'\xef\xbb\xbf\xef\xbb\xbf{"model": "google/veo-3.1"}',
        "nan": b'{"model": "google/veo-3.1", "x": NaN}',
        "infinity": b'{"model": "google/veo-3.1", "x": -Infinity}',
        # The body's decoder is built once and reused: a constant deep in a value, or as the whole
        # body, is refused there as at the top level, call after call.
        "nan-nested": b'{"model": "google/veo-3.1", "x": [1, {"y": NaN}]}',
        "infinity-whole": b"Infinity",
        "trailing-comma": b'{"model": "google/veo-3.1",}',
        "single-quotes": b"{'model': 'google/veo-3.1'}",
        "array": b'[{"model": "google/veo-3.1"}]',
        "string": b'"google/veo-3.1"',
        "model-array": b'{"model": ["google/veo-3.1"]}',
        "model-number": b'{"model": 3.1}',
        "model-null": b'{"model": null}',
        "model-object": b'{"model": {"id": "google/veo-3.1"}}',
        "nested-model": b'{"input": {"model": "google/veo-3.1"}}',
        "proto": b'{"__proto__": {"model": "google/veo-3.1"}}',
        "proto-and-model": b'{"__proto__": {"model": "x"}, "model": "test/test"}',
        "whitespace": b' \t\r\n{"model": "google/veo-3.1"}\r\n ',
        "trailing-garbage": b'{"model": "google/veo-3.1"} x',
        "two-objects": b'{"model": "test/test"}{"model": "google/veo-3.1"}',
        "empty": b"",
        "spaces-only": b"   ",
        "empty-object": b"{}",
        "invalid-utf8": b'{"model": "test/\xfftest"}',
        "lone-surrogate": b'{"model": "test/\\ud800"}',
        "control-char": b'{"model": "test/\x01test"}',
        "escaped-control": b'{"model": "test/test\\n"}',
        "leading-space-model": b'{"model": " google/veo-3.1"}',
        "non-ascii-model": '{"model": "модель"}'.encode(),
        "big-number": b'{"model": "test/test", "n": 1e400}',
        "deep": b'{"model": "test/test", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        "utf16": '{"model": "google/veo-3.1"}'.encode("utf-16"),
        "big": json.dumps({"model": "test/test", "prompt": "x" * 50_000}).encode(),
    }
    for label, body in bodies.items():
        yield f"json-{label}", body, aj
    plain = bodies["plain"]
    for ctype in [
        "application/json; charset=utf-8",
        "application/json; charset=UTF-8",
        "application/json;charset=utf-8",
        "APPLICATION/JSON",
        "application/json; charset=utf8",
        "application/json; charset=utf-16",
        "application/json; charset=latin1",
        "application/json; charset=utf-8; charset=latin1",
        "application/json; foo=bar",
        "application/json ; charset=utf-8",
        "application/json;\tcharset=utf-8",
        "application/vnd.api+json",
        "text/json",
        "application/json-patch+json",
        "application/jsonx",
        "text/plain",
        "application/octet-stream",
        None,
        "",
    ]:
        yield f"json-ctype-{ctype!r}", plain, ctype
    yield "json-utf16-declared", '{"model": "google/veo-3.1"}'.encode("utf-16-le"), "application/json; charset=utf-16le"


def _urlencoded() -> Iterator[Case]:
    form_type = "application/x-www-form-urlencoded"
    for body in [b"model=google%2Fveo-3.1&prompt=a+cat", b"model=test/test&model=google/veo-3.1", b"prompt=x", b""]:
        yield f"urlencoded-{body[:20]!r}", body, form_type
    yield "urlencoded-charset", b"model=google/veo-3.1", form_type + "; charset=utf-8"


def corpus() -> list[Case]:
    cases = [*SMUGGLING_CASES]
    for source in (
        _boundaries,
        _line_endings,
        _headers,
        _charsets,
        _encodings,
        _structure,
        _truncations,
        _json,
        _urlencoded,
    ):
        cases.extend(source())
    ids = [c[0] for c in cases]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return cases
