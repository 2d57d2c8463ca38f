"""Forward one guarded call and settle it: the upstream's answer streams to the client while its
observer reads the cost, and the flight is settled exactly once through `Runtime.settle`,
whether the call finished, broke off on either side or timed out.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from proxy.cost.observers import observer_for, readable_accept_encoding
from proxy.cost.scanner import Outcome
from proxy.deadlines import deadline_at
from proxy.errors import UpstreamBroken, UpstreamError, UpstreamNotSent
from proxy.guard.observed import learn
from proxy.guard.verdicts import Call, log_decision
from proxy.http.request import BodyLease
from proxy.http.upstream import (
    ClientStalled,
    WriteStalled,
    abort_client,
    arrived_whole,
    body_chunks,
    request_head,
    response_headers,
    send_within,
)
from proxy.money import MAX_CALL_MICROS
from proxy.policy.model import ModelsPolicy, Policy
from proxy.runtime import Flight, Runtime
from proxy.types import Receive, Scope, Send

# Request headers the guard replaces on a guarded call: it goes up with the guard's own
# X-Request-Id (the client's, when it is well-formed) and an Accept-Encoding narrowed to codings
# the guard can read.
REPLACED_REQUEST_HEADERS = frozenset({b"x-request-id", b"accept-encoding"})
# A virtual key's call also goes up with the real ImageRouter key instead of the client's token.
REPLACED_REQUEST_HEADERS_VIRTUAL = REPLACED_REQUEST_HEADERS | {b"authorization"}


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 µs more per call
class Admitted:
    """A spending call the guard let through: what `relay` forwards, settles and logs. Built
    once by the guard; nothing changes it after."""

    scope: Scope
    receive: Receive
    send: Send
    path: bytes  # the request target as sent (proxy.http.request.raw_path)
    body: bytes
    # The body's share of the process's bound on buffered bodies, released when the call ends.
    body_lease: BodyLease
    flight: Flight | None  # its reservation; None: forwarded unguarded (failed open)
    call: Call  # the decision record, completed here and logged at the end
    policy: Policy  # the policy the call was decided under


async def relay(rt: Runtime, admitted: Admitted) -> None:
    """Forward the admitted call's body, stream the answer to the client while reading its cost,
    and settle its flight exactly once, whatever happened on either side."""
    scope, receive, send = admitted.scope, admitted.receive, admitted.send
    call, flight, policy = admitted.call, admitted.flight, admitted.policy
    if flight is None and call.decision != "would_refuse":
        call.decision = "unguarded"
    virtual = call.upstream_auth is not None
    drop = REPLACED_REQUEST_HEADERS_VIRTUAL if virtual else REPLACED_REQUEST_HEADERS
    sent_headers = request_head(scope["headers"], drop=drop).sent + [("X-Request-Id", call.request_id)]
    if call.upstream_auth is not None:
        # A virtual key: the real ImageRouter key goes up, never the client's proxy token.
        sent_headers.append(("Authorization", call.upstream_auth.value))
    asked = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"accept-encoding"]
    if asked:
        sent_headers.append(("Accept-Encoding", readable_accept_encoding(asked)))
    outcome = Outcome("unknown")
    forwarded_at = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + policy.upstream.timeout_s
    resp: aiohttp.ClientResponse | None = None
    try:
        try:
            resp = await rt.upstream.open(
                scope["method"], admitted.path, scope.get("query_string", b""), sent_headers, admitted.body
            )
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
        # A client that takes nothing of the answer for --write-timeout-s is dropped sooner.
        sending, finished = True, False
        write_s = rt.settings.write_timeout_s
        try:
            async with deadline_at(deadline):
                await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                sending = False
                whole = arrived_whole(resp.content)
                if whole is not None:
                    observer.feed(whole)
                    outcome, finished = observer.finish(True), True
                    sending = True
                    await send_within(scope, send, {"type": "http.response.body", "body": whole}, write_s)
                    return
                async for chunk in body_chunks(resp.content):
                    observer.feed(chunk)
                    # After a client disconnect uvicorn drops these sends; we keep reading to the
                    # end so the call settles with ImageRouter's real cost.
                    sending = True
                    await send_within(
                        scope, send, {"type": "http.response.body", "body": chunk, "more_body": True}, write_s
                    )
                    sending = False
                outcome, finished = observer.finish(True), True
                sending = True
                await send_within(scope, send, {"type": "http.response.body", "body": b"", "more_body": False}, write_s)
        except (TimeoutError, aiohttp.ClientError, WriteStalled) as exc:
            if not finished:
                outcome = observer.finish(False)
            if not sending:
                call.outcome = "upstream_broken"
                raise UpstreamBroken(
                    f"upstream body of {call.request_id} broke off; the client's connection was cut"
                ) from exc
            call.outcome = "client_stalled"
            abort_client(scope)
            after = (
                f"--write-timeout-s={write_s:g}"
                if isinstance(exc, WriteStalled)
                else f"upstream.timeout_s={policy.upstream.timeout_s:g}"
            )
            raise ClientStalled(f"client of {call.request_id} stopped reading; dropped after {after}") from exc
    finally:
        if resp is not None:
            resp.release()
        rt.metrics.upstream_latency.observe(time.perf_counter() - forwarded_at)
        try:
            if flight is not None:
                # Awaited in this task: a cancellation cuts it, and Runtime.settle then leaves
                # it to the settle retries.
                await settle(rt, flight, outcome, call, policy.models)
        finally:
            admitted.body_lease.release()
            log_decision(call, policy)


async def settle(rt: Runtime, flight: Flight, outcome: Outcome, call: Call, models: ModelsPolicy) -> None:
    """Exactly once per reservation: error -> release, cost -> charge it, else charge the hold."""
    cost = 0 if outcome.kind == "error" else outcome.cost_micros if outcome.kind == "cost" else None
    call.outcome = call.outcome or outcome.kind
    call.cost_micros = await rt.settle(flight, cost)
    if outcome.kind == "cost" and flight.learn_as is not None and outcome.cost_micros is not None:
        # Only a cost ImageRouter reported is learned from: a release or an assumed charge says
        # nothing about what the signature costs.
        digest, text = flight.learn_as
        await learn(rt, digest, text, min(outcome.cost_micros, MAX_CALL_MICROS), models)
    if flight.reclaimed:
        call.outcome, call.cost_micros = "reclaimed", flight.amount_micros
