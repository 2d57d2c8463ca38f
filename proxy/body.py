"""Read what decides the price from a request body; the body itself is forwarded byte for byte.

Only `model`, `seconds`, `quality`, `size`, `stream` and `max_tokens` are read. A body we cannot
read is refused (400), never forwarded on a guess (DESIGN §1 step 3).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from urllib.parse import parse_qsl

from proxy.errors import Rejected

PRICE_FIELDS = frozenset({"model", "seconds", "quality", "size", "stream", "max_tokens"})
# One `; name=value` parameter: a token, or a quoted string with backslash escapes (RFC 9110 §5.6.6).
_PARAM_RE = re.compile(r'\s*;\s*([^\s;=]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]*))\s*')


@dataclass(frozen=True)
class PriceFields:
    model: str
    seconds: str | None = None
    quality: str | None = None
    size: str | None = None
    stream: bool = False
    max_tokens: int | None = None


def invalid(message: str) -> Rejected:
    return Rejected(400, "invalid_request_error", message)


def decode_content(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Undo a request Content-Encoding the upstream would undo too (gzip, deflate), bounded."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise invalid(f"Request Content-Encoding '{encoding[:40]}' is not supported by the spend guard.")
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else (zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS)
    out = bytearray()
    data = body
    try:
        # Every gzip member, as Node's zlib decodes them: a second member must not hide a field.
        while data:
            decompressor = zlib.decompressobj(wbits)
            out += decompressor.decompress(data, max_bytes + 1 - len(out))
            if len(out) > max_bytes:
                raise Rejected(413, "invalid_request_error", f"Request body exceeds {max_bytes} bytes once decompressed.")
            if not decompressor.eof:
                raise invalid(f"Request body is truncated {encoding} data.")
            data = decompressor.unused_data
            if encoding == "deflate" and data:
                raise invalid("Request body has data after its deflate stream.")
    except zlib.error as exc:
        raise invalid(f"Request body is not valid {encoding} data.") from exc
    return bytes(out)


def read_price_fields(body: bytes, content_type: str | None) -> PriceFields:
    """Pull the pricing fields out of a JSON, multipart or urlencoded body, or raise `Rejected(400)`."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json") or (not media and body.lstrip()[:1] == b"{"):
        fields = _from_json(body)
    elif media == "multipart/form-data":
        fields = _from_multipart(body, content_type or "")
    elif media == "application/x-www-form-urlencoded":
        fields = _from_urlencoded(body)
    else:
        raise invalid(
            f"Content-Type '{media[:60] or 'none'}' cannot be priced; send application/json or multipart/form-data."
        )
    return _build(fields)


def _from_json(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise invalid("Request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise invalid("Request body must be a JSON object.")
    return {k: v for k, v in data.items() if k in PRICE_FIELDS}


def _from_urlencoded(body: bytes) -> dict[str, object]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise invalid("Form body is not valid UTF-8.") from exc
    return _collect(pairs)


def _collect(pairs: list[tuple[str, str]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for name, value in pairs:
        if name not in PRICE_FIELDS:
            continue
        if name in found:
            # Two `model` fields: the upstream may pick either; refuse rather than guess.
            raise invalid(f"Form field '{name}' is given more than once.")
        found[name] = value
    return found


def _from_multipart(body: bytes, content_type: str) -> dict[str, object]:
    boundary = parameters(content_type).get("boundary")
    if not boundary:
        raise invalid("multipart/form-data without a boundary.")
    delimiter = b"--" + boundary.encode("latin-1")
    pairs: list[tuple[str, str]] = []
    pos = body.find(delimiter)
    if pos < 0:
        raise invalid("multipart body does not contain its boundary.")
    closed = False
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            closed = True
            break
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        next_pos = body.find(b"\r\n" + delimiter, head_end + 4)
        if next_pos < 0:
            break
        headers = body[pos:head_end]
        name, is_file = _part_name(headers)
        if name in PRICE_FIELDS and not is_file:
            try:
                pairs.append((name, body[head_end + 4 : next_pos].decode("utf-8")))
            except UnicodeDecodeError as exc:
                raise invalid(f"Form field '{name}' is not valid UTF-8.") from exc
        pos = next_pos + 2
    if not closed:
        raise invalid("multipart body is truncated or malformed.")
    return _collect(pairs)


def parameters(header: str) -> dict[str, str]:
    """`type; a=1; b="x; y"` -> {"a": "1", "b": "x; y"}, names lower-cased; quotes respected.

    Anything that does not parse, or a parameter given twice, raises 400: the upstream's parser
    might read it differently, so the guard does not guess."""
    params: dict[str, str] = {}
    rest = header[header.find(";") :] if ";" in header else ""
    pos = 0
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if not match or match.end() == pos:
            raise invalid("Malformed header parameters in a multipart request.")
        name = match.group(1).lower()
        value = re.sub(r"\\(.)", r"\1", match.group(2)) if match.group(2) is not None else match.group(3)
        if name in params:
            raise invalid(f"Header parameter '{name[:40]}' is given more than once.")
        params[name] = value
        pos = match.end()
    return params


def _part_name(headers: bytes) -> tuple[str | None, bool]:
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            params = parameters(value.decode("utf-8", "replace"))
            if "name*" in params:
                # RFC 5987 names decode differently across parsers; a pricing field must be plain.
                raise invalid("multipart part names must not use the extended name* form.")
            return params.get("name"), "filename" in params or "filename*" in params
    return None, False


def _build(fields: dict[str, object]) -> PriceFields:
    model = fields.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("Request has no 'model'; the spend guard prices every call by its model.")
    stream = fields.get("stream", False)
    if isinstance(stream, str):
        stream = stream.strip().lower() in ("true", "1")
    max_tokens = fields.get("max_tokens")
    return PriceFields(
        model=model.strip(),
        seconds=_opt_str(fields.get("seconds")),
        quality=_opt_str(fields.get("quality")),
        size=_opt_str(fields.get("size")),
        stream=stream is True,
        max_tokens=max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None,
    )


def _opt_str(value: object) -> str | None:
    if value is None:
        return None
    return str(value)[:64]
