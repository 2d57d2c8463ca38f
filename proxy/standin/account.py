"""The stand-in's account: its ledger (`_bill`, which moves the balance and the key rows) and the
routes that read it (/v1/credits, served as it stood `credits_lag_s` ago; /v2/models and
/v2/models/{id}), and the model lookup a generation prices by."""

from __future__ import annotations

import asyncio
import decimal
import json
import threading
import time
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from proxy.standin.wire import UNAUTHORIZED, _error_json, _json_response, fingerprint, format_usd


class Account:
    """The account routes of `StandIn` (proxy/standin/server.py), which sets this state in `reset`."""

    lock: threading.Lock
    credits_remaining_micros: int
    total_deposits_micros: int | None  # None: remaining + charged, so credit_usage == charged
    key_rows: list[dict[str, Any]]
    key_ids: dict[str, str]  # bearer token -> api_key_id: billing also moves that row's figures
    models: dict[str, dict[str, Any]]
    unlisted_aliases: dict[str, str]  # resolved before the lookup, never listed by /v2/models
    models_as_array: bool
    account_key: str
    credits_status: int
    credits_body: bytes | None
    credits_delay_s: float
    # /v1/credits serves the figures as they stood this long ago (a replica behind the ledger): a
    # call it has pre-charged is not in them yet.
    credits_lag_s: float
    _ledger_history: list[tuple[float, int, int, str]]  # (billed at, remaining, charged, key rows)
    credits_calls: int
    models_calls: int
    charged_micros: int
    charged_by_key: dict[str, int]

    def _bill(self, token: str, micros: int, *, new_request: bool = False) -> None:
        """Move `micros` from the balance to the ledger (negative = refund). Caller holds lock."""
        if self.credits_lag_s > 0:
            # what /v1/credits serves until credits_lag_s has passed (_lagged_figures)
            now = time.monotonic()
            self._ledger_history.append(
                (now, self.credits_remaining_micros, self.charged_micros, json.dumps(self.key_rows))
            )
            while self._ledger_history and self._ledger_history[0][0] < now - self.credits_lag_s - 60:
                del self._ledger_history[0]
        self.credits_remaining_micros -= micros
        self.charged_micros += micros
        fp = fingerprint(token)
        self.charged_by_key[fp] = self.charged_by_key.get(fp, 0) + micros
        key_id = self.key_ids.get(token)
        row = next((r for r in self.key_rows if r.get("api_key_id") == key_id), None) if key_id else None
        if row is not None:
            delta = decimal.Decimal(micros) / 1_000_000
            for name in ("credit_usage", "period_spend"):
                row[name] = f"{decimal.Decimal(row.get(name) or 0) + delta:.4f}"
            if new_request:
                row["total_requests"] = int(row.get("total_requests") or 0) + 1

    async def _credits(self, request: web.BaseRequest, query: str) -> web.Response:
        with self.lock:
            self.credits_calls += 1
            delay_s = self.credits_delay_s
        if delay_s:
            await asyncio.sleep(delay_s)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return _json_response(401, _error_json(UNAUTHORIZED, "unauthorized"))
        with self.lock:
            if token != self.account_key:
                return _json_response(401, _error_json("Invalid API key", "unauthorized"))
            status, override = self.credits_status, self.credits_body
            remaining, charged, rows_text = self._lagged_figures()
            deposits = self.total_deposits_micros
            if deposits is None:
                deposits = remaining + charged
            rows = json.loads(rows_text)
        if override is not None:
            return web.Response(status=status, body=override, content_type="application/json")
        if status != 200:
            if status == 401:
                return _json_response(401, _error_json("Invalid API key", "unauthorized"))
            return _json_response(status, _error_json("Failed to fetch credit information", "internal_error"))
        payload: dict[str, Any] = {
            "remaining_credits": format_usd(remaining),
            "credit_usage": format_usd(deposits - remaining),
            "total_deposits": format_usd(deposits),
        }
        if parse_qs(query).get("by_api_key") == ["true"]:
            payload["usage_by_api_key"] = rows
        return _json_response(200, json.dumps(payload).encode())

    def _lagged_figures(self) -> tuple[int, int, str]:
        """Balance, charged total and key rows as /v1/credits serves them (credits_lag_s ago). Caller holds lock."""
        if self.credits_lag_s > 0:
            cutoff = time.monotonic() - self.credits_lag_s
            for billed_at, remaining, charged, rows in self._ledger_history:
                if billed_at > cutoff:
                    return remaining, charged, rows
        return self.credits_remaining_micros, self.charged_micros, json.dumps(self.key_rows)

    def _models(self) -> web.Response:
        with self.lock:
            self.models_calls += 1
            models = json.loads(json.dumps(self.models))
            as_array = self.models_as_array
        document: object = list(models.values()) if as_array else models
        return _json_response(200, json.dumps(document).encode())

    def _model(self, model_id: str) -> web.Response:
        with self.lock:
            self.models_calls += 1
            entry = self.models.get(model_id)
            body = json.dumps(entry).encode()
        if entry is None:
            return _json_response(
                404,
                json.dumps(
                    {
                        "error": {
                            "message": f"The model '{model_id}' does not exist.",
                            "type": "invalid_request_error",
                            "param": "model",
                            "code": "model_not_found",
                        }
                    }
                ).encode(),
            )
        return _json_response(200, body)

    def _lookup(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            name = self.unlisted_aliases.get(name, name)  # as ImageRouter's validators do first
            entry = self.models.get(name)
            if entry is None:
                entry = next((m for m in self.models.values() if name in (m.get("aliases") or ())), None)
            return json.loads(json.dumps(entry)) if entry is not None else None
