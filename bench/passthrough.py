"""The bare baseline: the proxy's stack (pure ASGI on uvicorn, one aiohttp session) with no guard.

    python bench/passthrough.py --port P --upstream http://127.0.0.1:U

Forwards method, path, query, headers and body (read whole when its size is declared, as the
guard does on a spending route; streamed when chunked), and streams the answer back chunk by
chunk with `resp.content.iter_any()`. Same uvicorn settings as `spend-guard serve`. The
difference between this and `spend-guard serve` on the same request is what the guard costs.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import uvicorn
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class Passthrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        assert self.session is not None
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in HOP_BY_HOP | {b"host"}
        ]
        declared = next((v for k, v in headers if k.lower() == "content-length"), None)
        data: bytes | AsyncIterator[bytes] | None = None
        if declared is not None:
            data = await read_body(receive)  # a sized body goes out sized, as the guard sends it
        elif any(k.lower() == b"transfer-encoding" for k, _ in scope["headers"]):
            data = stream_body(receive)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        url = self.upstream + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        resp = await self.session.request(
            scope["method"],
            URL(url, encoded=True),
            headers=headers,
            data=data,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            allow_redirects=False,
            compress=False,
        )
        try:
            out = [(k, v) for k, v in resp.raw_headers if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            resp.release()

    async def lifespan(self, receive: Any, send: Any) -> None:
        await receive()
        self.session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0),
        )
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await self.session.close()
        await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive: Any) -> bytes:
    chunks = [chunk async for chunk in stream_body(receive)]
    return b"".join(chunks)


async def stream_body(receive: Any) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(
        Passthrough(args.upstream),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
