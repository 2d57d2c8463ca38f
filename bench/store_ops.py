"""The client's CPU per store operation, alone and batched: `--tasks` tasks each reserve and settle
in a loop for `--seconds`, once with every operation its own EVALSHA (`Store`) and once through
the batcher (`BatchedLedger`), alternated `--rounds` times, on a redis-server of its own.

    python bench/store_ops.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from procs import Procs, start_redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.store.batch import BatchedLedger  # noqa: E402
from proxy.store.records import ReserveRequest, Snapshot  # noqa: E402
from proxy.store.redis import Store  # noqa: E402

CREDITS = 10**15  # micro-dollars: no reserve is ever refused


async def one_run(url: str, batched: bool, tasks: int, seconds: float) -> str:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    store = Store(client, "ops")
    now_ms = int(time.time() * 1000)
    await store.apply_snapshot(Snapshot(now_ms, CREDITS, {}))
    ledger = BatchedLedger(store) if batched else store
    ops = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal ops
        i = 0
        while time.monotonic() < stop:
            hold_id = f"{w}-{i}"
            i += 1
            now = int(time.time() * 1000)
            req = ReserveRequest(hold_id, 1, now, now + 60_000, 0, 3_600_000, None, (0, 0, 0))
            assert (await ledger.reserve(req)).allowed
            await ledger.settle(hold_id, 1, now)
            ops += 2

    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(tasks)))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    per_trip = ops / ledger.round_trips if isinstance(ledger, BatchedLedger) else 1.0
    await client.aclose()
    kind = "batched" if batched else "alone"
    rates = f"{ops / wall:8.0f} ops/s  {1e6 * cpu / ops:6.1f} us of client CPU/op"
    return f"  {kind:8s} {rates}  {per_trip:5.1f} ops/round trip"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="spend-guard-store-ops-")
    procs = Procs(root)
    try:
        url = start_redis(procs, dict(os.environ))
        print(f"store operations, {args.tasks} tasks, {args.seconds:g} s a run, redis-server on {url}")
        for _ in range(args.rounds):
            for batched in (False, True):
                print(asyncio.run(one_run(url, batched, args.tasks, args.seconds)))
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
