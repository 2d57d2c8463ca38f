"""Memory under large responses: N concurrent 20 MiB downloads, the server's RSS sampled meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import aiohttp
from procs import rss_kib
from wrkdrive import API_KEY, BODY

SAMPLE_EVERY_S = 0.01
CHUNK = 64 * 1024


@dataclass(frozen=True)
class MemoryResult:
    baseline_mib: float
    peak_mib: float
    received_mib: float  # per request, the smallest seen (a short body would hide a problem)
    failures: int
    seconds: float

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.baseline_mib


class RssSampler(threading.Thread):
    """Reads VmRSS of every pid every 10 ms until stopped; keeps the peak of their sum."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak_kib = 0
        self.stopping = threading.Event()

    def current_kib(self) -> int:
        return sum(rss_kib(pid) or 0 for pid in self.pids)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.peak_kib = max(self.peak_kib, self.current_kib())
            time.sleep(SAMPLE_EVERY_S)

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        return self.peak_kib


async def _fetch(session: aiohttp.ClientSession, method: str, url: str, pause_s: float) -> int:
    kwargs: dict[str, object] = {}
    if method == "POST":
        kwargs = {"data": BODY, "headers": {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}}
    async with session.request(method, url, **kwargs) as resp:  # type: ignore[arg-type]
        if resp.status != 200:
            await resp.read()
            return -1
        size = 0
        async for chunk in resp.content.iter_chunked(CHUNK):
            size += len(chunk)  # discarded
            if pause_s:
                await asyncio.sleep(pause_s)
        return size


async def _many(method: str, url: str, concurrency: int, pause_s: float) -> list[int | BaseException]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        return await asyncio.gather(
            *(_fetch(session, method, url, pause_s) for _ in range(concurrency)), return_exceptions=True
        )


def measure(pids: list[int], method: str, url: str, *, concurrency: int = 10, pause_s: float = 0.0) -> MemoryResult:
    """RSS just before `concurrency` simultaneous downloads of `url`, and its peak while they run.

    `pause_s` > 0 makes each client a slow reader (a pause after every 64 KiB), so the server has
    to hold back rather than buffer.
    """
    sampler = RssSampler(pids)
    baseline = sampler.current_kib()
    started = time.monotonic()
    sampler.start()
    try:
        results = asyncio.run(_many(method, url, concurrency, pause_s))
    finally:
        peak = sampler.stop()
    sizes = [r for r in results if isinstance(r, int) and r >= 0]
    return MemoryResult(
        baseline_mib=baseline / 1024,
        peak_mib=max(peak, baseline) / 1024,
        received_mib=(min(sizes) if len(sizes) == len(results) else 0) / (1024 * 1024),
        failures=len(results) - len(sizes),
        seconds=time.monotonic() - started,
    )
