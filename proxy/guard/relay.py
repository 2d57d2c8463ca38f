"""Forward one guarded call and settle it: the upstream's answer streams to the client while its
observer reads the cost, and the flight is settled exactly once through `Runtime.settle`,
whether the call finished, broke off on either side or timed out (DESIGN §1 steps 6-7).
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar

import aiohttp

from proxy.cost.observers import observer_for, readable_accept_encoding
from proxy.cost.scanner import Outcome
from proxy.deadlines import deadline_at
from proxy.errors import UpstreamBroken, UpstreamError, UpstreamNotSent
from proxy.guard.verdicts import Call, log_decision
from proxy.http.request import BodyLease
from proxy.http.upstream import ClientStalled, abort_client, request_head, response_headers
from proxy.policy.model import Policy
from proxy.runtime import Flight, Runtime
from proxy.types import Receive, Scope, Send

# A guarded call goes up with the guard's own X-Request-Id (the client's, when it is well-formed)
# and an Accept-Encoding narrowed to codings the guard can read.
GUARD_SETS = frozenset({b"x-request-id", b"accept-encoding"})
# The request body the current call holds in memory (set by the guard when it reads the body,
# released here when the call ends).
HELD_BODY: ContextVar[BodyLease | None] = ContextVar("HELD_BODY", default=None)


async def relay(
    rt: Runtime,
    scope: Scope,
    receive: Receive,
    send: Send,
    path: bytes,
    body: bytes,
    flight: Flight | None,
    call: Call,
    policy: Policy,
) -> None:
    """Forward `body`, stream the answer to the client while reading its cost, and settle the
    flight (None: an unguarded call) exactly once, whatever happened on either side."""
    if flight is None and call.decision != "would_refuse":
        call.decision = "unguarded"
    sent_headers = request_head(scope["headers"], drop=GUARD_SETS).sent + [("X-Request-Id", call.request_id)]
    asked = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"accept-encoding"]
    if asked:
        sent_headers.append(("Accept-Encoding", readable_accept_encoding(asked)))
    outcome = Outcome("unknown")
    forwarded_at = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + policy.upstream.timeout_s
    resp: aiohttp.ClientResponse | None = None
    try:
        try:
            resp = await rt.upstream.open(scope["method"], path, scope.get("query_string", b""), sent_headers, body)
        except UpstreamError as exc:
            # Nothing was received from ImageRouter. A connect that failed or timed out never
            # reached it (release); a later timeout or broken connection might have been billed
            # (charge the hold).
            if isinstance(exc, UpstreamNotSent):
                outcome = Outcome("error")
            call.upstream_status, call.outcome = exc.status, "upstream_error"
            await exc.response(call.headers)(scope, receive, send)
            return
        call.upstream_status = resp.status
        if flight is not None:
            flight.started_ms = rt.now_ms()
        observer = observer_for(resp.headers.get("Content-Type"), resp.headers.get("Content-Encoding"))
        out_headers = response_headers(resp) + [(k.lower().encode(), v.encode()) for k, v in call.headers.items()]
        # upstream.timeout_s bounds the whole call, time blocked sending to a client that stopped
        # reading included, so a hold's lease (hold_ttl_s > timeout_s) never ends under it.
        sending, finished = True, False
        try:
            async with deadline_at(deadline):
                await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                sending = False
                async for chunk in resp.content.iter_any():
                    observer.feed(chunk)
                    # After a client disconnect uvicorn drops these sends; we keep reading to the
                    # end so the call settles with ImageRouter's real cost.
                    sending = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sending = False
                outcome, finished = observer.finish(True), True
                sending = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, aiohttp.ClientError) as exc:
            if not finished:
                outcome = observer.finish(False)
            if not sending:
                call.outcome = "upstream_broken"
                raise UpstreamBroken(
                    f"upstream body of {call.request_id} broke off; the client's connection was cut"
                ) from exc
            call.outcome = "client_stalled"
            abort_client(scope)
            raise ClientStalled(
                f"client of {call.request_id} stopped reading; "
                f"dropped after upstream.timeout_s={policy.upstream.timeout_s:g}"
            ) from exc
    finally:
        if resp is not None:
            resp.release()
        rt.metrics.upstream_latency.observe(time.perf_counter() - forwarded_at)
        if flight is not None:
            await asyncio.shield(settle(rt, flight, outcome, call))
        held = HELD_BODY.get()
        if held is not None:
            held.release()
        log_decision(call, policy)


async def settle(rt: Runtime, flight: Flight, outcome: Outcome, call: Call) -> None:
    """Exactly once per reservation: error -> release, cost -> charge it, else charge the hold."""
    cost = 0 if outcome.kind == "error" else outcome.cost_micros if outcome.kind == "cost" else None
    call.outcome = call.outcome or outcome.kind
    call.cost_micros = await rt.settle(flight, cost)
    if flight.reclaimed:
        call.outcome, call.cost_micros = "reclaimed", flight.amount_micros
