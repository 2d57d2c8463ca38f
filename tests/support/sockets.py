"""Raw sockets against a served proxy, for what an HTTP client library would not send or would
tidy up: half-sent heads, pipelines, dot segments in a path."""

from __future__ import annotations

import json
import socket


def connect(port: int, **opts: int) -> socket.socket:
    """A connection to 127.0.0.1:`port`; `opts` are SOL_SOCKET options by name (SO_RCVBUF=4096)."""
    sock = socket.socket()
    for name, value in opts.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `timeout` passes (False)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return data, True
    except ConnectionResetError:
        return data, True
    except TimeoutError:
        return data, False


def envelope(reply: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """Status, headers and JSON body of one raw HTTP/1.1 answer."""
    head_part, _, body = reply.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body)
