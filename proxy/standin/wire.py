"""The stand-in's wire format: ImageRouter's models, key rows, money strings, and `X-Standin` plans."""

from __future__ import annotations

import base64
import decimal
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from proxy.http.numbers import js_number

IMAGE_ROUTES = {
    "/v1/openai/images/generations": "image",
    "/v1/openai/images/edits": "image",
    "/v1/openai/videos/generations": "video",
    # A spending route the proxy's default table lacks: ImageRouter has a branch adding a POST
    # /v1/responses that generates images, video and audio (pre-charged like an image call).
    "/v1/responses": "image",
}
TEXT_ROUTES = {
    "/v1/openai/chat/completions": "chat",
    "/v1/openai/responses": "responses",
}
GENERATION_ROUTES = {**IMAGE_ROUTES, **TEXT_ROUTES}

DEFAULT_ACCOUNT_KEY = "sk-account-" + "0" * 53
DEFAULT_BALANCE_MICROS = 100_000_000
DEFAULT_INTERVAL_S = 0.05
# A text model missing from `models` (the models list only covers image and video) is accepted
# with no pre-charge and this default cost, the docs' example chat charge.
TEXT_DEFAULT_COST_UNITS = 1
WRITE_CHUNK = 64 * 1024
MICROS_PER_UNIT = 100  # ImageRouter counts credits in 1/10,000 USD
SHUTDOWN_TIMEOUT_S = 0.2
PARTIAL_BODY = b'{"created":1,"data":[{"url":"ht'
PARTIAL_SSE = b'data: {"id":"chatcmpl-1","choi'
INSUFFICIENT = (
    "Insufficient credits (this model needs minimum ${usd} credits), "
    "please topup your ImageRouter account: https://imagerouter.io/pricing"
)
UNAUTHORIZED = "Authorization header must be provided as Bearer token"

# 64 KiB of valid base64 (4 | 65536), written repeatedly for `b64=`.
_B64_CHUNK = base64.b64encode(bytes(range(256)) * 192)
assert len(_B64_CHUNK) == WRITE_CHUNK


# Aliases ImageRouter's validators resolve before the model lookup without `/v2/models` listing
# them (its `MODEL_ALIASES`): a call to one runs, and is billed as, the model it names.
UNLISTED_ALIASES = {
    "briaai/RMBG-2.0": "bria/remove-background",
    "google/gemini-2.5-flash-image": "google/gemini-2.5-flash",
    "gemini-2.5-flash-image": "google/gemini-2.5-flash",
    "google/gemini-3-pro-image": "google/gemini-3-pro",
    "gemini-3-pro-image": "google/gemini-3-pro",
    "kwaivgi/kling-2.1-master": "kling/kling-2.1-master",
    "kwaivgi/kling-2.1-pro": "kling/kling-2.1-pro",
    "kwaivgi/wan-2.6": "wan/wan-2.6",
}


def default_models() -> dict[str, dict[str, Any]]:
    def model(
        model_id: str,
        low: float,
        avg: float,
        high: float,
        output: str,
        aliases: list[str] | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": model_id,
            "price": {"min": low, "average": avg, "max": high},
            "aliases": aliases or [],
            "output": [output],
        }
        if inputs is not None:
            entry["inputs"] = inputs
        return entry

    return {
        "test/test": model("test/test", 0, 0, 0, "image"),
        "openai/gpt-image-1": model("openai/gpt-image-1", 0.011, 0.167, 0.3, "image"),
        "google/gemini-2.5-flash": model(
            "google/gemini-2.5-flash", 0.039, 0.039, 0.039, "image", ["gemini-2.5-flash-image"]
        ),
        "ir/test-video": model("ir/test-video", 0, 0, 0, "video"),
        "google/veo-3.1": model("google/veo-3.1", 1.2, 1.6, 3.2, "video"),
        "kling/kling-2.1-master": model("kling/kling-2.1-master", 0.924, 1.4, 2.8, "video"),
        # Calculated prices (`CALCULATED_PRICES`), listed with ImageRouter's published maxima and inputs.
        "tencent/hunyuan-video-1.5": model(
            "tencent/hunyuan-video-1.5",
            0.2,
            0.2,
            0.2,
            "video",
            inputs={"image": True, "size": list(HUNYUAN_PER_SECOND), "seconds": [5, 8]},
        ),
        "xAI/grok-imagine-video": model(
            "xAI/grok-imagine-video",
            0.05,
            0.35,
            1.052,
            "video",
            inputs={"image": True, "size": [*GROK_720P, *GROK_480P], "seconds": list(range(1, 16))},
        ),
        "runware/Flux-2-Dev-Turbo": model(
            "runware/Flux-2-Dev-Turbo", 0.008, 0.0084, 0.024, "image", inputs={"image": True, "size": ["custom"]}
        ),
    }


# ImageRouter's calculated prices (its `calcFunction`s): the pre-charge, and the final charge, of
# a call to these models is computed from the request as its validators read it.
HUNYUAN_PER_SECOND = {"832x480": 0.02, "480x832": 0.02, "1280x720": 0.04, "720x1280": 0.04}
GROK_720P = ("1280x720", "960x720", "1088x720", "720x720", "720x1088", "720x960", "720x1280")
GROK_480P = ("848x480", "640x480", "720x480", "480x480", "480x720", "480x640", "480x848")
_SIZE_FIELD = re.compile(r"\d+[xX×*]\d+", re.ASCII)  # the validators' `size` rule (or `auto`)
QUALITIES = ("auto", "low", "medium", "high")  # the validators' `quality` enum
_SIZE_VALUE = re.compile(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", re.ASCII)  # extractWidthHeight


@dataclass(frozen=True)
class CalcParams:
    """What a calculated price reads: `seconds` as zod's coerce leaves it (a number, or `auto`),
    `size` (`auto` when absent), the input image files of a multipart body and `quality` (`auto`
    when absent)."""

    seconds: float | str
    size: str
    images: int
    quality: str = "auto"


def _hunyuan(params: CalcParams) -> float:
    per_second = HUNYUAN_PER_SECOND.get(params.size)
    if per_second is None or isinstance(params.seconds, str):
        raise ValueError("Invalid size for Hunyuan Video 1.5 - price calculation failed")
    return per_second * params.seconds  # the raw seconds, not one of the listed durations


def _grok_video(params: CalcParams) -> float:
    if isinstance(params.seconds, str):
        raise ValueError("price calculation failed")  # 0.07 * 'auto' is NaN upstream
    return (0.05 if params.size in GROK_480P else 0.07) * params.seconds


def _flux_2_dev_turbo(params: CalcParams) -> float:
    found = _SIZE_VALUE.fullmatch(params.size)
    width, height = (int(found.group(1)), int(found.group(2))) if found else (1024, 1024)
    return ((1 if params.images else 0) + width * height / 1_000_000) * 0.008


CALCULATED_PRICES: dict[str, Callable[[CalcParams], float]] = {
    "tencent/hunyuan-video-1.5": _hunyuan,
    "xAI/grok-imagine-video": _grok_video,
    "runware/Flux-2-Dev-Turbo": _flux_2_dev_turbo,
}


def calc_params(content_type: str, body: bytes) -> CalcParams:
    """The request as ImageRouter's validators read it for a price (ValueError where they refuse):
    `seconds` is `auto` or `Number(value)` between 1 and 60, `size` is `auto` or `WxH`."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    images = 0
    data: dict[str, Any]
    if ctype == "multipart/form-data":
        data = dict(_form_fields(content_type, body))
        images = _image_files(content_type, body)
    else:
        parsed = json.loads(body)
        data = parsed if isinstance(parsed, dict) else {}
    raw = data.get("seconds", "auto")
    seconds: float | str = "auto"
    if raw != "auto":
        number = js_number(raw)  # z.coerce.number
        if math.isnan(number) or not 1 <= number <= 60:
            raise ValueError("'seconds' must be a number from 1 to 60")
        seconds = number
    size = data.get("size", "auto")
    if not isinstance(size, str) or (size != "auto" and not _SIZE_FIELD.fullmatch(size)):
        raise ValueError("'size' must be 'auto' or in the format 'WIDTHxHEIGHT' (e.g. '1024x768')")
    quality = data.get("quality", "auto")
    if quality not in QUALITIES:
        raise ValueError("Invalid enum value. Expected 'auto' | 'low' | 'medium' | 'high'")
    return CalcParams(seconds, size, images, quality)


def _image_files(content_type: str, body: bytes) -> int:
    """File parts named `image` or `image[]` (multer's input images)."""
    params = BytesHeaderParser().parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n")
    boundary = str(params.get_param("boundary"))
    count = 0
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        head = part.lstrip(b"\r\n").partition(b"\r\n\r\n")[0]
        headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if name in ("image", "image[]") and headers.get_param("filename", header="content-disposition") is not None:
            count += 1
    return count


def format_usd(micros: int) -> str:
    """Micro-dollars as ImageRouter prints money: a string with exactly four decimals."""
    return f"{decimal.Decimal(micros) / 1_000_000:.4f}"


def fingerprint(token: str) -> str:
    """The key `charged_by_key` uses for a bearer token: its sha256 hex digest."""
    return hashlib.sha256(token.encode()).hexdigest()


def b64_text(n: int) -> str:
    """The `b64_json` string a `b64=n` response carries (for checking a passed-through body)."""
    full, rest = divmod(n, WRITE_CHUNK)
    return (_B64_CHUNK * full + _B64_CHUNK[:rest]).decode()


def key_row(
    api_key_id: str,
    name: str,
    *,
    spend_limit: str | float | None = None,
    period: str | None = None,
    period_spend: str = "0.0000",
    period_start: str | None = None,
    expires_at: str | None = None,
    is_active: bool = True,
    credit_usage: str = "0.0000",
    total_requests: int = 0,
    created_at: str = "2026-01-01T00:00:00.000Z",
) -> dict[str, Any]:
    """A `usage_by_api_key` row in ImageRouter's format (money as 4-decimal strings)."""
    limit = None if spend_limit is None else f"{decimal.Decimal(str(spend_limit)):.4f}"
    return {
        "api_key_id": api_key_id,
        "api_key_name": name,
        "credit_usage": f"{decimal.Decimal(credit_usage):.4f}",
        "total_requests": total_requests,
        "created_at": created_at,
        "is_active": is_active,
        "spend_limit": limit,
        "spend_limit_period": period,
        "period_spend": f"{decimal.Decimal(period_spend):.4f}",
        "period_start": period_start,
        "expires_at": expires_at,
    }


@dataclass
class Recorded:
    """One request as received: raw path (percent-encoding kept), raw query, headers in order."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    time: float  # time.monotonic() on arrival

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)


class StandinError(Exception):
    """A test asked for something the stand-in cannot do (bad `X-Standin`)."""


@dataclass
class Plan:
    """What one request should do, parsed from `X-Standin`."""

    heartbeat: int = 0
    interval_s: float = DEFAULT_INTERVAL_S
    gate: str | None = None
    cost_units: int | None = None  # actual cost in 1/10,000 USD
    early_cost_units: int | None = None  # SSE: a cost on the first chunk, none on the final one
    nocost: bool = False
    error: bool = False
    status: int | None = None
    cut: bool = False
    b64: int | None = None
    gzip: bool = False
    sse: bool = False
    slow_s: float = 0.0
    echo: bool = False

    @classmethod
    def parse(cls, header: str) -> Plan:
        plan = cls()
        for item in header.split(","):
            name, eq, value = item.strip().partition("=")
            name, value = name.strip(), value.strip()
            if not name:
                continue
            flag = name in ("nocost", "error", "cut", "gzip", "sse", "echo")
            if flag == bool(eq):
                raise StandinError(f"behaviour {item.strip()!r}: unknown, or value missing/unexpected")
            try:
                if flag:
                    setattr(plan, name, True)
                elif name == "heartbeat":
                    plan.heartbeat = int(value)
                elif name == "interval":
                    plan.interval_s = float(value)
                elif name == "gate":
                    plan.gate = value
                elif name in ("cost", "earlycost"):
                    usd = decimal.Decimal(value)
                    if not usd.is_finite() or usd < 0:
                        raise ValueError(value)
                    units = int((usd * 10000).to_integral_value(rounding=decimal.ROUND_CEILING))
                    if name == "cost":
                        plan.cost_units = units
                    else:
                        plan.early_cost_units = units
                elif name == "status":
                    plan.status = int(value)
                elif name == "b64":
                    plan.b64 = int(value)
                elif name == "slow":
                    plan.slow_s = float(value)
                else:
                    raise StandinError(f"unknown behaviour {name!r}")
            except (ValueError, decimal.InvalidOperation) as exc:
                raise StandinError(f"behaviour {item.strip()!r}: bad value") from exc
        if plan.status is not None and not plan.error:
            raise StandinError("status= only goes with error")
        if plan.status is not None and plan.heartbeat:
            raise StandinError("status= cannot follow a heartbeat: the 200 headers already went")
        if plan.gzip and (plan.heartbeat or plan.sse):
            raise StandinError("gzip cannot be combined with heartbeat or sse")
        if plan.early_cost_units is not None and not plan.sse:
            raise StandinError("earlycost= only goes with sse")
        return plan

    @property
    def streamed(self) -> bool:
        """Headers go first and the body follows in chunks (else one response with a length)."""
        if self.status is not None:
            return False
        return bool(self.heartbeat or self.gate or self.sse or self.b64 is not None or self.cut)


def _price_units(usd: float | int | str | None) -> int:
    # ImageRouter's own conversion, float artefact included: ceil(0.07 * 10000) == 701.
    return math.ceil(float(usd or 0) * 10000)


def _error_json(message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_}}).encode()


def _json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Non-file fields of a multipart/form-data body (enough to find `model`)."""
    params = BytesHeaderParser().parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n")
    boundary = params.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("multipart body without boundary")
    fields: dict[str, str] = {}
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if part.startswith(b"--"):
            break
        head, sep, value = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str) and headers.get_param("filename", header="content-disposition") is None:
            fields[name] = value.removesuffix(b"\r\n").decode("utf-8", "replace")
    return fields


def _model_field(content_type: str, body: bytes) -> object:
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        return _form_fields(content_type, body).get("model")
    if ctype == "application/x-www-form-urlencoded":
        values = parse_qs(body.decode("utf-8", "replace")).get("model")
        return values[0] if values else None
    data = json.loads(body)
    return data.get("model") if isinstance(data, dict) else None
