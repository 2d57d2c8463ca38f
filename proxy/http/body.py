"""Read what decides the price from a request body; the body itself is forwarded byte for byte.

Only `model`, `seconds`, `quality`, `size`, `stream` and the number of input image files are
read, from JSON (as express.json() reads it) or multipart/form-data (as busboy does;
proxy/http/multipart.py). A body we cannot read exactly as ImageRouter will is refused (400),
never forwarded on a guess: a guess could price one model while the upstream runs another
(docs/how-it-works.md). For a text route the reader also takes what bounds the call's tokens
(docs/text-holds.md): `max_tokens`, `max_completion_tokens`, `max_output_tokens`, `n` and
reasoning budgets, each as JavaScript's `Number()` reads it, and an upper bound on the input's
size in bytes, with image, audio and file parts counted apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import zlib
from dataclasses import dataclass

from proxy.errors import Rejected
from proxy.http.multipart import PRICE_FIELDS, HeaderValue, boundary_of, invalid, parse_header_value, read_form
from proxy.http.numbers import js_number
from proxy.untrusted import excerpt

__all__ = ["PRICE_FIELDS", "PriceFields", "decode_content", "invalid", "read_price_fields"]

# Reasoning budgets: tokens a model may spend thinking, billed as output. Anthropic's
# `thinking.budget_tokens`; the `reasoning.max_tokens` of OpenRouter-style chat and responses
# bodies; Gemini's `thinking_config.thinking_budget` through its OpenAI compatibility (sent under
# `extra_body.google` or `google`); Qwen's top-level `thinking_budget`.
REASONING_BUDGETS = (
    ("thinking", "budget_tokens"),
    ("reasoning", "max_tokens"),
    ("google", "thinking_config", "thinking_budget"),
    ("extra_body", "google", "thinking_config", "thinking_budget"),
    ("thinking_budget",),
)
# Content-Type values up to this long are remembered once parsed (256 of them: at most ~64 KB);
# longer ones are parsed each time.
CACHED_CONTENT_TYPE_BYTES = 256
# Content parts (an element of a message's `content` array: chat `messages[]`, responses
# `input[]`) whose payload is not text: an image, an audio clip or a file, sent inline (base64, a
# data: URI) or by reference (a URL, a file id).
MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file"})
# Where such a part carries its payload: chat `image_url.url`, `input_audio.data`,
# `file.file_data`/`file.file_id`; responses `image_url`, `file_data`, `file_id`, `file_url`;
# an Anthropic-style `source.data`/`source.url`. Any other string of the part is counted as text.
MEDIA_PAYLOADS = (
    ("image_url",),
    ("image_url", "url"),
    ("input_audio", "data"),
    ("file", "file_data"),
    ("file", "file_id"),
    ("file_data",),
    ("file_id",),
    ("file_url",),
    ("source", "data"),
    ("source", "url"),
)


@dataclass(frozen=True)
class PriceFields:
    """What prices a call. On a text route, token counts are read as JavaScript's `Number()`
    reads them (proxy/http/numbers.py; `"0x10"` is 16), kept only when positive and finite,
    rounded up (`100.0` and `1e2` are 100); else None. Elsewhere they are not read."""

    model: str
    seconds: str | None = None
    # `seconds` as ImageRouter's validator reads it (`Number()`, as zod's coerce does): None when it
    # is absent, `auto` or not a finite number (ImageRouter refuses those or ignores them).
    seconds_number: float | None = None
    # Input image files of a multipart body (`image`, `image[]`); a JSON body carries none.
    input_images: int = 0
    quality: str | None = None
    size: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_output_tokens: int | None = None
    n: int | None = None  # chat choices
    reasoning_tokens: int | None = None  # the largest reasoning budget the body sets
    # A token maximum sent as something other than a JSON number ("12", true): ImageRouter reads
    # it as `Number()` does, but a provider behind it may ignore it, so it limits nothing.
    loose_maximum: bool = False
    # Text routes only: an upper bound on the UTF-8 bytes of the input's text (the body's length,
    # less the payloads of media parts), and the number of inputs not carried as text.
    input_bytes: int = 0
    media_parts: int = 0


def decode_content(body: bytes, content_encoding: str | None, max_bytes: int, content_type: str | None) -> bytes:
    """Undo a request Content-Encoding the upstream would undo too, bounded: gzip or zlib-wrapped
    deflate on a JSON body, as body-parser does. multer undoes none: ImageRouter would parse a
    compressed form's raw bytes (a gzip header's comment can hold a whole other form), so an
    encoded multipart body is refused."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if (content_type or "").strip(" \t").lower().startswith("multipart/"):
        raise invalid(
            "ImageRouter reads a multipart body without undoing its Content-Encoding; send the form uncompressed."
        )
    if encoding not in ("gzip", "deflate"):
        raise invalid(f"Request Content-Encoding '{excerpt(encoding, 40)}' is not supported; use gzip or deflate.")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS  # deflate: zlib-wrapped, as Node's inflate
    out = bytearray()
    data = body
    try:
        # Every gzip member, as Node's zlib decodes them: a second member must not hide a field.
        while data:
            decompressor = zlib.decompressobj(wbits)
            out += decompressor.decompress(data, max_bytes + 1 - len(out))
            if len(out) > max_bytes:
                raise Rejected(
                    413, "invalid_request_error", f"Request body exceeds {max_bytes} bytes once decompressed."
                )
            if not decompressor.eof:
                raise invalid(f"Request body is truncated {encoding} data.")
            data = decompressor.unused_data
            if encoding == "deflate" and data:
                raise invalid("Request body has data after its deflate stream.")
    except zlib.error as exc:
        raise invalid(f"Request body is not valid {encoding} data.") from exc
    return bytes(out)


def read_price_fields(body: bytes, content_type: str | None, *, text: bool = False) -> PriceFields:
    """Pull the pricing fields out of a JSON or multipart body, or raise `Rejected(400)`.

    The guard prices what ImageRouter's own parsers will read (express.json(), multer over
    busboy; docs/imagerouter-api.md), or refuses. `text`: a text route's call, whose input size
    is measured too (docs/text-holds.md)."""
    if content_type is None:
        raise invalid(
            "Request has no Content-Type, so its body was not read as JSON; send Content-Type: application/json "
            "(or multipart/form-data). ImageRouter reads only those two."
        )
    # Node strips the header's surrounding whitespace; media-typer (which decides whether
    # express.json() or multer runs) allows no tab inside it.
    ctype = _content_type(content_type.strip(" \t"))
    if ctype.head == "application/json":
        data, size = _from_json(body, ctype.params)
        fields = _build({k: v for k, v in data.items() if k in PRICE_FIELDS})
        if not text:
            return fields
        return _text_fields(fields, data, *_input_size(data, size))
    if ctype.head == "multipart/form-data":
        # Every byte of a form may be text: its whole length bounds the input. A form's values are
        # strings ImageRouter's text routes never parse: no token count is read from them.
        form, images = read_form(body, boundary_of(ctype.params))
        fields = dataclasses.replace(_build(dict(form)), input_images=images)
        return dataclasses.replace(fields, input_bytes=len(body)) if text else fields
    if ctype.head == "application/x-www-form-urlencoded":
        # ImageRouter mounts no urlencoded parser: such a body reaches it without a model. It is
        # what `curl -d` sends unless told otherwise.
        raise invalid(
            "Request body was sent as application/x-www-form-urlencoded (curl -d's default), so it was not read as "
            "JSON; send Content-Type: application/json (curl: -H 'Content-Type: application/json') "
            "or multipart/form-data."
        )
    raise invalid(
        f"Request body was sent as '{excerpt(ctype.head, 60)}', so it was not read as JSON; send Content-Type: "
        "application/json or multipart/form-data."
    )


def _from_json(body: bytes, params: dict[str, str]) -> tuple[dict[str, object], int]:
    # body-parser decodes by the charset parameter (anything `utf-*`, through iconv-lite); we read
    # UTF-8 only, strictly, and drop one leading BOM as iconv-lite does. Then JSON.parse: the last
    # of duplicate keys wins (as in a dict), `\u` escapes decode, NaN/Infinity are not JSON.
    charset = params.get("charset", "utf-8").lower()
    if charset != "utf-8":
        raise invalid(f"JSON charset '{excerpt(charset)}' is not supported by the spend guard; send UTF-8.")
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        data = _JSON.decode(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise invalid("Request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise invalid("Request body must be a JSON object.")
    return data, len(body)


def _input_size(data: dict[str, object], size: int) -> tuple[int, int]:
    """(input bytes, media parts) of a parsed text request of `size` bytes.

    Every BPE token covers at least one byte, so the bytes of the input's text bound its tokens.
    The body's own length bounds those bytes (a JSON escape is never shorter than what it
    decodes to; keys, quotes and brackets are slack for the few tokens a chat template adds per
    message). A media part's payload is no measure of its tokens (a 20-byte URL can be a
    1,000-token image), so that payload alone is taken out of the count and the part is counted
    apart. Only an element of a message's `content` array is a part: a `type` on the body or on
    a message changes nothing. A stored response, conversation or prompt template the body refers
    to counts as one too."""
    media = 0
    payload = 0
    for part in _content_parts(data):
        if part.get("type") in MEDIA_PART_TYPES:
            media += 1
            payload += sum(_utf8_bytes(value) for _, value in _paths_present(part, MEDIA_PAYLOADS))
    for name in ("previous_response_id", "conversation"):
        if data.get(name) not in (None, ""):
            media += 1
    if isinstance(data.get("prompt"), dict):  # a stored prompt template, not prompt text
        media += 1
    return max(0, size - payload), media


def _content_parts(data: dict[str, object]) -> list[dict[str, object]]:
    """Every content part of the body's messages (chat `messages[]`, responses `input[]`): the
    elements of a message's `content` array, and of a part's own `content` array (a tool
    result's), at any depth."""
    arrays: list[object] = []
    for name in ("messages", "input"):
        messages = data.get(name)
        if isinstance(messages, list):
            arrays.extend(message.get("content") for message in messages if isinstance(message, dict))
    parts: list[dict[str, object]] = []
    while arrays:
        array = arrays.pop()
        if isinstance(array, list):
            for part in array:
                if isinstance(part, dict):
                    parts.append(part)
                    arrays.append(part.get("content"))
    return parts


def _utf8_bytes(value: object) -> int:
    """UTF-8 bytes of a string (a lone surrogate counts 3, as in JSON); 0 for anything else."""
    if not isinstance(value, str):
        return 0
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


# One decoder for every body (json.loads with an argument builds a decoder each call).
_JSON = json.JSONDecoder(parse_constant=_not_json)


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
    seconds = fields.get("seconds")
    number = None if seconds is None or seconds == "auto" else js_number(seconds)
    return PriceFields(
        model=model,
        seconds=_opt_str(seconds),
        seconds_number=number if number is not None and math.isfinite(number) else None,
        quality=_opt_str(fields.get("quality")),
        size=_opt_str(fields.get("size")),
        stream=stream is True,
    )


def _text_fields(fields: PriceFields, data: dict[str, object], input_bytes: int, media_parts: int) -> PriceFields:
    """`fields` with what bounds a text call's tokens, read from its parsed JSON body `data`."""
    budgets = [_count(".".join(path), value) for path, value in _paths_present(data, REASONING_BUDGETS)]
    given = [budget for budget in budgets if budget is not None]
    return dataclasses.replace(
        fields,
        max_tokens=_count("max_tokens", data.get("max_tokens")),
        max_completion_tokens=_count("max_completion_tokens", data.get("max_completion_tokens")),
        max_output_tokens=_count("max_output_tokens", data.get("max_output_tokens")),
        n=_choices(data.get("n")),
        reasoning_tokens=max(given) if given else None,
        loose_maximum=any(_loose(data.get(name)) for name in TOKEN_MAXIMUMS),
        input_bytes=input_bytes,
        media_parts=media_parts,
    )


def _paths_present(data: dict[str, object], paths: tuple[tuple[str, ...], ...]) -> list[tuple[tuple[str, ...], object]]:
    """(path, value) for each of `paths` whose value `data` holds (None where it is absent)."""
    present = []
    for path in paths:
        value: object = data
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if value is not None:
            present.append((path, value))
    return present


def _count(name: str, value: object) -> int | None:
    """A token maximum as `Number()` reads it, if positive and finite, rounded up; else None
    (absent, `null`, `""`, 0, negative, Infinity: the request sets no maximum). Not a number:
    refused, since ImageRouter's reading of it cannot be known."""
    if value is None:
        return None
    number = js_number(value)
    if math.isnan(number):
        raise _not_a_number(name, value)
    if not math.isfinite(number) or number <= 0:
        return None
    return math.ceil(number)


TOKEN_MAXIMUMS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _loose(value: object) -> bool:
    """A value that counts as a maximum once `Number()` reads it, but is not a JSON number."""
    return value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)))


def _choices(value: object) -> int | None:
    """`n` as `Number()` reads it, rounded up; None (one choice) unless positive. An infinite
    count bounds nothing, so it is refused like a value that is not a number."""
    if value is None:
        return None
    number = js_number(value)
    if math.isnan(number) or number == math.inf:
        raise _not_a_number("n", value)
    return math.ceil(number) if number > 0 else None


def _not_a_number(name: str, value: object) -> Rejected:
    if isinstance(value, (dict, list)):
        shown = "an object" if isinstance(value, dict) else "an array"
    else:
        shown = excerpt(json.dumps(value), 40)
    return invalid(
        f"'{name}' is {shown}, not a finite number as ImageRouter reads one (JavaScript's Number()); "
        "send a JSON number."
    )


def _opt_str(value: object) -> str | None:
    if value is None:
        return None
    return str(value)[:64]


def _content_type(value: str) -> HeaderValue:
    """A Content-Type parsed once: clients send the same few (its parameters are only read)."""
    if len(value) > CACHED_CONTENT_TYPE_BYTES:
        return _parse_content_type(value)
    return _content_type_cached(value)


@functools.lru_cache(maxsize=256)
def _content_type_cached(value: str) -> HeaderValue:
    return _parse_content_type(value)


def _parse_content_type(value: str) -> HeaderValue:
    return parse_header_value(value, media_type=True, tabs=False, what="Content-Type")
