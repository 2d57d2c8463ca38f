"""Read what decides the price from a request body; the body itself is forwarded byte for byte.

Only `model`, `seconds`, `quality`, `size`, `stream` and `max_tokens` are read, from JSON (as
express.json() reads it) or multipart/form-data (as busboy does; proxy/multipart.py). A body we
cannot read exactly as ImageRouter will is refused (400), never forwarded on a guess (DESIGN §1
step 3, issue #12).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

from proxy.echo import echo
from proxy.errors import Rejected
from proxy.multipart import PRICE_FIELDS, boundary_of, invalid, parse_header_value, read_fields

__all__ = ["PRICE_FIELDS", "PriceFields", "decode_content", "invalid", "read_price_fields"]


@dataclass(frozen=True)
class PriceFields:
    model: str
    seconds: str | None = None
    quality: str | None = None
    size: str | None = None
    stream: bool = False
    max_tokens: int | None = None


def decode_content(body: bytes, content_encoding: str | None, max_bytes: int, content_type: str | None) -> bytes:
    """Undo a request Content-Encoding the upstream would undo too, bounded: gzip or zlib-wrapped
    deflate on a JSON body, as body-parser does. multer undoes none: ImageRouter would parse a
    compressed form's raw bytes (a gzip header's comment can hold a whole other form), so an
    encoded multipart body is refused (issue #12)."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if (content_type or "").strip(" \t").lower().startswith("multipart/"):
        raise invalid("ImageRouter reads a multipart body without undoing its Content-Encoding; send the form uncompressed.")
    if encoding not in ("gzip", "deflate"):
        raise invalid(f"Request Content-Encoding '{echo(encoding, 40)}' is not supported; use gzip or deflate.")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS  # deflate: zlib-wrapped, as Node's inflate
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
    """Pull the pricing fields out of a JSON or multipart body, or raise `Rejected(400)`.

    The guard prices what ImageRouter's own parsers will read (express.json(), multer over
    busboy; reference/imagerouter-api.md §9), or refuses: issue #12."""
    if content_type is None:
        raise invalid(
            "Request has no Content-Type, so its body was not read as JSON; send Content-Type: application/json "
            "(or multipart/form-data). ImageRouter reads only those two."
        )
    # Node strips the header's surrounding whitespace; media-typer (which decides whether
    # express.json() or multer runs) allows no tab inside it.
    ctype = parse_header_value(content_type.strip(" \t"), media_type=True, tabs=False, what="Content-Type")
    if ctype.head == "application/json":
        return _build(_from_json(body, ctype.params))
    if ctype.head == "multipart/form-data":
        return _build(dict(read_fields(body, boundary_of(ctype.params))))
    if ctype.head == "application/x-www-form-urlencoded":
        # ImageRouter mounts no urlencoded parser: such a body reaches it without a model. It is
        # what `curl -d` sends unless told otherwise.
        raise invalid(
            "Request body was sent as application/x-www-form-urlencoded (curl -d's default), so it was not read as "
            "JSON; send Content-Type: application/json (curl: -H 'Content-Type: application/json') or multipart/form-data."
        )
    raise invalid(
        f"Request body was sent as '{echo(ctype.head, 60)}', so it was not read as JSON; send Content-Type: "
        "application/json or multipart/form-data."
    )


def _from_json(body: bytes, params: dict[str, str]) -> dict[str, object]:
    # body-parser decodes by the charset parameter (anything `utf-*`, through iconv-lite); we read
    # UTF-8 only, strictly, and drop one leading BOM as iconv-lite does. Then JSON.parse: the last
    # of duplicate keys wins (as in a dict), `\u` escapes decode, NaN/Infinity are not JSON.
    charset = params.get("charset", "utf-8").lower()
    if charset != "utf-8":
        raise invalid(f"JSON charset '{echo(charset)}' is not supported by the spend guard; send UTF-8.")
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise invalid("Request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise invalid("Request body must be a JSON object.")
    return {k: v for k, v in data.items() if k in PRICE_FIELDS}


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _build(fields: dict[str, object]) -> PriceFields:
    model = fields.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("Request has no 'model'; the spend guard prices every call by its model.")
    if model != model.strip() or not model.isprintable():
        # ImageRouter runs the string as sent (no trimming): price that string, or nothing.
        raise invalid("'model' has surrounding whitespace or control characters; send the model id as listed.")
    stream = fields.get("stream", False)
    if isinstance(stream, str):
        stream = stream.strip().lower() in ("true", "1")
    max_tokens = fields.get("max_tokens")
    return PriceFields(
        model=model,
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
