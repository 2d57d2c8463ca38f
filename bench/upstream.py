"""The fast upstream stand-in: nginx with a generated config, answering like ImageRouter would.

Locations (all static, so nginx costs next to nothing next to the Python processes it feeds):

- `GET /v1/credits`, `GET /v2/models`: fixed documents (one key-less account, one priced model).
- `/v1/openai/videos/generations`: the 20 MiB body, for any method. nginx's static module refuses
  POST with 405, so the location returns 405 itself and `error_page 405 =200 /big/20m` turns it
  into an internal GET of the file: a guarded POST route that answers 20 MiB (memory test).
- `GET /big/20m`: the same file on a path the guard does not price (unguarded memory test).
- anything else under `/v1/`: the small generation answer with its `cost` (throughput tests).
"""

from __future__ import annotations

import json
import os
import random

CREDITS = {
    "remaining_credits": "1000000.0000",
    "credit_usage": "0.0000",
    "total_deposits": "1000000.0000",
    "usage_by_api_key": [],
}
MODEL = "test/bench"
MODELS = {MODEL: {"id": MODEL, "price": {"min": 0.001, "average": 0.001, "max": 0.001}}}
GENERATION = '{"created":1,"data":[{"url":"https://x/y.webp"}],"latency":1,"cost":0.001}'
BIG_BYTES = 20 * 1024 * 1024
BIG_NAME = "big20m.json"
BIG_PATH = "/big/20m"
BIG_GUARDED_PATH = "/v1/openai/videos/generations"
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def write_big_body(path: str, size: int = BIG_BYTES) -> None:
    """`{"data":[{"b64_json":"..."}],"cost":0.001}`, `size` bytes in all, the cost at the very end."""
    head, tail = b'{"data":[{"b64_json":"', b'"}],"cost":0.001}'
    rng = random.Random(20)
    block = bytes(rng.choice(_B64) for _ in range(64 * 1024))
    filler = size - len(head) - len(tail)
    with open(path, "wb") as f:
        f.write(head)
        while filler > 0:
            f.write(block[: min(filler, len(block))])
            filler -= len(block)
        f.write(tail)


def _literal(text: str) -> str:
    """An nginx single-quoted string."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def nginx_config(root: str, port: int) -> str:
    credits, models = json.dumps(CREDITS, separators=(",", ":")), json.dumps(MODELS, separators=(",", ":"))
    big = os.path.join(root, BIG_NAME)
    return f"""
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/credits {{ return 200 {_literal(credits)}; }}
        location = /v2/models {{ return 200 {_literal(models)}; }}
        location = {BIG_PATH} {{ alias {big}; }}
        location = {BIG_GUARDED_PATH} {{
            error_page 405 =200 {BIG_PATH};
            return 405;
        }}
        location / {{ return 200 {_literal(GENERATION)}; }}
    }}
}}
"""


def nginx_command(nginx: str, root: str, port: int) -> list[str]:
    """Write the config and the 20 MiB body into `root`; the command that serves them in the foreground."""
    os.chmod(root, 0o755)  # a root master runs its worker as nobody, which must read the body file
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_config(root, port))
    big = os.path.join(root, BIG_NAME)
    if not os.path.exists(big):
        write_big_body(big)
    directives = f"daemon off; pid {root}/nginx.pid; error_log {root}/nginx-error.log warn;"
    return [nginx, "-p", root, "-c", conf, "-g", directives]
