"""Read a multipart/form-data body as ImageRouter's parser does, or refuse it.

ImageRouter runs multer 2.0.2 over busboy 1.6 (docs/imagerouter-api.md). The guard reads
the same fields busboy reads, and refuses with 400 whatever busboy and a more lenient parser (an
RFC 2046 one, Python's, a WAF's) could read differently, so no spelling of a body makes the guard
price one model while the upstream runs another. Refused:

- a delimiter `--BOUNDARY` anywhere but at the start of the body or right after CRLF (also in
  the preamble, in part data, and in the epilogue after the close delimiter);
- any byte after a delimiter other than CRLF or the closing `--` (busboy 1.6 does not honour
  RFC 2046 transport padding either: a padded delimiter hides the part that follows);
- a part whose headers are folded, malformed (busboy's HeaderParser rules), empty, over 16 KiB,
  or not ended before the next delimiter; a header given twice;
- a Content-Disposition that is malformed, not `form-data`, has no `name`, repeats a parameter,
  uses the extended `name*` form or a backslash escape other than `\\"` and `\\\\`;
- on a price-deciding field: a file (`filename`, `filename*` or application/octet-stream), a
  charset other than utf-8/us-ascii (or bytes that are not valid in it), a Content-Type busboy
  cannot parse, a Content-Transfer-Encoding other than 7bit/8bit/binary, a bracketed name such
  as `model[]` (multer's append-field turns it into `model`), a value of 1 MiB or more;
- a price-deciding field given twice; any field of 1 MiB or more (multer refuses it); a body
  without its close delimiter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import Rejected
from proxy.untrusted import excerpt

PRICE_FIELDS = frozenset({"model", "seconds", "quality", "size", "stream", "max_tokens"})
# The file fields multer takes as input images on the image and video routes (`upload.fields`).
IMAGE_FILE_FIELDS = frozenset({"image", "image[]"})
INPUT_IMAGE = ("image", "")  # what `_read_part` returns for an input image file
# RFC 9110 tchar: busboy's TOKEN table, media-typer's and content-type's token.
TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# busboy's FIELD_VCHAR: what a part header value may hold (HT, visible ASCII, obs-text).
_FIELD_VCHAR = frozenset([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
# RFC 2231 attr-char (busboy's EXTENDED_VALUE) and RFC 2046 bchars for a boundary.
_ATTR_CHAR = frozenset(b"!#$&+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_EXT_PREFIX_RE = re.compile(r"[A-Za-z0-9!#$%&+\-^_`{}~]+'[^']*'")
MAX_HEADER_BYTES = 16 * 1024  # busboy's MAX_HEADER_SIZE: past it a part header is an error
MAX_HEADER_LINES = 1000  # busboy ignores headers past its 2000th pair; we stop well before
MAX_FIELD_BYTES = 1024 * 1024  # busboy's default fieldSize: multer refuses a longer field
# Field charsets whose bytes decode the same in busboy and everywhere else, and the Python codec
# that checks them strictly (busboy decodes us-ascii as latin1, so only 7-bit bytes agree).
_CHARSETS = {"utf-8": "utf-8", "utf8": "utf-8", "us-ascii": "ascii", "ascii": "ascii"}
_IDENTITY_TRANSFER = frozenset({"7bit", "8bit", "binary"})


def invalid(message: str) -> Rejected:
    """The 400 for a body the guard will not price (X-Spend-Guard-Scope: request)."""
    return Rejected(400, "invalid_request_error", message, scope="request")


@dataclass(frozen=True)
class HeaderValue:
    """`head; a=1; b="x"`: the leading token or media type, lower-cased, and its parameters."""

    head: str
    params: dict[str, str]
    extended: frozenset[str]  # names of RFC 2231 `name*=charset'lang'value` parameters


def parse_header_value(text: str, *, media_type: bool, tabs: bool, what: str) -> HeaderValue:
    """Parse `head *( OWS ";" OWS name "=" value ) OWS` in the one form every parser ImageRouter
    runs reads alike (busboy's parseContentType/parseDisposition, media-typer, content-type), or
    raise 400: no whitespace around `=`, quoted strings escaping only `"` and `\\`, no parameter
    given twice. `media_type`: the head is `type/subtype`; `tabs`: HT counts as whitespace."""
    ws = " \t" if tabs else " "
    n, i = len(text), 0
    while i < n and ord(text[i]) in TOKEN:
        i += 1
    if media_type:
        if i == 0 or i == n or text[i] != "/":
            raise invalid(f"{what} has no media type.")
        i += 1
        start = i
        while i < n and ord(text[i]) in TOKEN:
            i += 1
        if i == start:
            raise invalid(f"{what} has no media subtype.")
    head = text[:i].lower()
    params: dict[str, str] = {}
    extended: set[str] = set()
    while True:
        while i < n and text[i] in ws:
            i += 1
        if i == n:
            return HeaderValue(head, params, frozenset(extended))
        if text[i] != ";":
            raise invalid(f"{what} is malformed after '{excerpt(text[:i])}'.")
        i += 1
        while i < n and text[i] in ws:
            i += 1
        start = i
        while i < n and ord(text[i]) in TOKEN:
            i += 1
        if i == start or i == n or text[i] != "=":
            raise invalid(f"{what} has a malformed parameter (no whitespace is allowed around '=').")
        name = text[start:i].lower()
        i += 1
        if name.endswith("*"):
            i, value = _extended_value(text, i, what)
            extended.add(name)
        elif i < n and text[i] == '"':
            i, value = _quoted(text, i + 1, tabs, what)
        else:
            start = i
            while i < n and ord(text[i]) in TOKEN:
                i += 1
            if i == start:
                raise invalid(f"{what} has a parameter without a value.")
            value = text[start:i]
        if name in params:
            raise invalid(f"{what} gives the parameter '{excerpt(name)}' more than once.")
        params[name] = value


def _quoted(text: str, i: int, tabs: bool, what: str) -> tuple[int, str]:
    out: list[str] = []
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return i + 1, "".join(out)
        if ch == "\\":
            # busboy keeps the backslash of `\x` unless x is `"` or `\`; others drop it: refuse.
            if i + 1 >= n or text[i + 1] not in '"\\':
                raise invalid(f"{what} has a quoted string with an ambiguous backslash escape.")
            out.append(text[i + 1])
            i += 2
            continue
        code = ord(ch)
        if not (code == 0x20 or code == 0x21 or 0x23 <= code <= 0x7E or 0x80 <= code <= 0xFF or (tabs and code == 9)):
            raise invalid(f"{what} has a control character in a quoted string.")
        out.append(ch)
        i += 1
    raise invalid(f"{what} has an unterminated quoted string.")


def _extended_value(text: str, i: int, what: str) -> tuple[int, str]:
    """An RFC 2231 `charset'lang'value`, kept as written (the guard never uses its meaning)."""
    match = _EXT_PREFIX_RE.match(text, i)
    if not match:
        raise invalid(f"{what} has a malformed extended (RFC 2231) parameter.")
    i = match.end()
    start = i
    while i < len(text):
        if ord(text[i]) in _ATTR_CHAR:
            i += 1
        elif text[i] == "%" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1 : i + 3]):
            i += 3
        else:
            break
    if i == start:
        raise invalid(f"{what} has an extended (RFC 2231) parameter without a value.")
    return i, text[start:i]


def boundary_of(params: dict[str, str]) -> bytes:
    boundary = params.get("boundary")
    if boundary is None:
        raise invalid("multipart/form-data without a boundary.")
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise invalid("multipart boundary must be 1-70 RFC 2046 characters, not ending in a space.")
    return boundary.encode("latin-1")


def read_fields(body: bytes, boundary: bytes) -> list[tuple[str, str]]:
    """The price-deciding fields busboy would hand to multer, in order; or raise 400."""
    return read_form(body, boundary)[0]


def read_form(body: bytes, boundary: bytes) -> tuple[list[tuple[str, str]], int]:
    """The price-deciding fields busboy would hand to multer, in order, and the number of input
    image files (parts named `image` or `image[]` that busboy reads as files); or raise 400."""
    dash_boundary = b"--" + boundary
    needle = b"\r\n" + dash_boundary
    data = b"\r\n" + body  # busboy writes CRLF first, so a delimiter may open the body
    _refuse_delimiters_off_line_start(data, dash_boundary)
    pos = data.find(needle)
    if pos < 0:
        raise invalid("multipart body does not contain its boundary at the start of a line.")
    fields: list[tuple[str, str]] = []
    seen: set[str] = set()
    images = 0
    while True:
        after = pos + len(needle)
        tail = data[after : after + 2]
        if tail == b"--":
            if data.find(dash_boundary, after + 2) >= 0:
                raise invalid("multipart body repeats its boundary after the close delimiter.")
            return fields, images
        if tail != b"\r\n":
            if len(tail) < 2:
                raise invalid("multipart body is truncated: no close delimiter.")
            raise invalid(
                "multipart delimiter is followed by bytes other than CRLF or '--' (transport padding included)."
            )
        start = after + 2
        pos = data.find(needle, start)
        if pos < 0:
            raise invalid("multipart body is truncated: no close delimiter.")
        found = _read_part(data, start, pos)
        if found is INPUT_IMAGE:
            images += 1
        elif found is not None:
            name, value = found
            if name in seen:
                # Two `model` fields: the upstream may pick either; refuse rather than guess.
                raise invalid(f"Form field '{name}' is given more than once.")
            seen.add(name)
            fields.append(found)


def _refuse_delimiters_off_line_start(data: bytes, dash_boundary: bytes) -> None:
    """A `--BOUNDARY` not right after CRLF is data to busboy but a delimiter to lenient parsers
    (bare LF, mid-line). Boundaries are chosen not to occur in content, so refusing costs nothing."""
    at = data.find(dash_boundary, 2)
    while at >= 0:
        if data[at - 2 : at] != b"\r\n":
            raise invalid("multipart boundary appears where it is not a delimiter (not right after CRLF).")
        at = data.find(dash_boundary, at + 1)


def _read_part(data: bytes, start: int, end: int) -> tuple[str, str] | None:
    """One part, `data[start:end]` between delimiters: (name, value) for a price-deciding field,
    else None. Indices, not a slice: a 25 MB image is not copied to be skipped."""
    if data.startswith(b"\r\n", start):
        raise invalid("multipart part has no headers.")  # busboy: "Malformed part header"
    head_end = data.find(b"\r\n\r\n", start, end)
    if head_end < 0:
        raise invalid("multipart part headers do not end before the next delimiter.")
    if head_end + 4 - start >= MAX_HEADER_BYTES:
        raise invalid("multipart part headers exceed 16 KiB.")
    headers: dict[str, str] = {}
    lines = data[start:head_end].split(b"\r\n")
    if len(lines) > MAX_HEADER_LINES:
        raise invalid(f"multipart part has more than {MAX_HEADER_LINES} header lines.")
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise invalid("multipart part headers must not be folded across lines.")
        name_end = 0
        while name_end < len(line) and line[name_end] in TOKEN:
            name_end += 1
        if (
            name_end == 0
            or line[name_end : name_end + 1] != b":"
            or any(b not in _FIELD_VCHAR for b in line[name_end + 1 :])
        ):
            raise invalid("multipart part has a malformed header line.")
        key = line[:name_end].decode("ascii").lower()
        if key in headers:
            raise invalid(f"multipart part gives the header '{excerpt(key)}' more than once.")
        headers[key] = line[name_end + 1 :].decode("latin-1").lstrip(" \t")
    disposition = headers.get("content-disposition")
    if disposition is None:
        return None  # busboy skips a part without one, as any parser must
    disp = parse_header_value(disposition, media_type=False, tabs=True, what="A part's Content-Disposition")
    if disp.head != "form-data":
        raise invalid("multipart part's Content-Disposition is not form-data.")
    if "name*" in disp.params:
        # RFC 5987 names decode differently across parsers (busboy ignores them); a pricing field must be plain.
        raise invalid("multipart part names must not use the extended name* form.")
    name = disp.params.get("name")
    if not name:
        raise invalid("multipart part has no name.")  # multer refuses it too (MISSING_FIELD_NAME)
    root = name.split("[", 1)[0]
    if root in PRICE_FIELDS and name != root:
        raise invalid(
            f"Form field '{excerpt(name)}' would be read as '{root}' by the upstream (multer's bracket syntax)."
        )
    if name not in PRICE_FIELDS:
        is_file = (
            "filename" in disp.params or "filename*" in disp.params or _media(headers) == "application/octet-stream"
        )
        if not is_file and end - head_end - 4 >= MAX_FIELD_BYTES:
            raise invalid(f"Form field '{excerpt(name)}' is 1 MiB or longer; ImageRouter refuses such a field.")
        return INPUT_IMAGE if is_file and name in IMAGE_FILE_FIELDS else None
    if disp.extended:
        # busboy drops the whole part when it cannot decode an RFC 2231 value; others do not.
        raise invalid(f"Form field '{name}' has an extended (RFC 2231) parameter.")
    return name, _field_value(name, data[head_end + 4 : end], headers, disp)


def _media(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip(" \t").lower()


def _field_value(name: str, raw: bytes, headers: dict[str, str], disp: HeaderValue) -> str:
    if "filename" in disp.params or "filename*" in disp.params:
        raise invalid(f"Form field '{name}' is sent as a file (it has a filename).")
    charset = "utf-8"
    if "content-type" in headers:
        ctype = parse_header_value(
            headers["content-type"], media_type=True, tabs=True, what=f"Form field '{name}''s Content-Type"
        )
        if ctype.extended:
            raise invalid(f"Form field '{name}' has an extended (RFC 2231) Content-Type parameter.")
        if ctype.head == "application/octet-stream":
            raise invalid(f"Form field '{name}' is sent as a file (application/octet-stream).")
        charset = ctype.params.get("charset", charset).lower()
    codec = _CHARSETS.get(charset)
    if codec is None:
        raise invalid(
            f"Form field '{name}' has charset '{excerpt(charset)}'; "
            "the spend guard reads price fields in utf-8 or us-ascii only."
        )
    encoding = headers.get("content-transfer-encoding")
    if encoding is not None and encoding.strip(" \t").lower() not in _IDENTITY_TRANSFER:
        raise invalid(f"Form field '{name}' has a Content-Transfer-Encoding; send it unencoded.")
    if len(raw) >= MAX_FIELD_BYTES:
        raise invalid(f"Form field '{name}' is 1 MiB or longer.")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise invalid(f"Form field '{name}' is not valid {charset}.") from exc
