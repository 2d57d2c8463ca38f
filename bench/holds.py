"""How well holds fit calls: `models.holds: max` against `observed`, through the stand-in's
request-priced tiers (proxy/standin/tiers.py), the proxy in process on an in-process store.

    python bench/holds.py [--calls 2000] [--seed 7]

Prints, for each holds mode:

1. a mixed workload (gpt-image-1 and dall-e-3 at random qualities and sizes; sora-2 and veo-3.1
   videos of 4 to 12 s) after a warm-up: hold / cost at the median and the 99th percentile, for
   images and for video, and the number of under-holds;
2. a key with a $1.00/day budget sending calls of that workload one after another: the calls
   admitted before the first refusal, beside the number the budget could have paid for;
3. a team with a $12.00/day budget starting 4 s sora-2 calls (a 12-second-max model) that stay
   in flight: how many run at once before the first refusal; and the same with 4 to 12 s calls;
4. a price rise mid-run (every tier x 1.5): under-holds counted, what was charged beyond the
   holds, and the bound (the calls in flight when the price rose, cost - hold each).

Nothing is billed and nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import statistics
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import fakeredis
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.policy.load import load_policy
from proxy.settings import Settings
from proxy.standin import StandIn
from proxy.standin.tiers import TIERED_PRICES
from proxy.standin.wire import CalcParams

IMAGES = "/v1/openai/images/generations"
VIDEOS = "/v1/openai/videos/generations"
WARM = "sk-bench-warm-" + "w" * 40
SOLO = "sk-bench-solo-" + "s" * 40
TEAM = "sk-bench-team-" + "t" * 40
TEAM2 = "sk-bench-team2-" + "u" * 40
QUALITIES = ("low", "medium", "high", "auto")
SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
MIN_OBSERVATIONS = 20  # the default


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def policy_text(holds: str, min_observations: int = MIN_OBSERVATIONS) -> str:
    return textwrap.dedent(
        f"""
        account: {{name: bench, refresh_s: 3600, models_refresh_s: 3600, max_staleness_s: 7200}}
        models: {{holds: {holds}, observed: {{min_observations: {min_observations}, margin: 0.1}}}}
        groups:
          - name: team
            budgets: [{{limit_usd: 12.00, period: day}}]
          - name: team2
            budgets: [{{limit_usd: 12.00, period: day}}]
        keys:
          - name: warm
            key_sha256: {sha(WARM)}
          - name: solo
            key_sha256: {sha(SOLO)}
            budgets: [{{limit_usd: 1.00, period: day}}]
          - name: team
            key_sha256: {sha(TEAM)}
            group: team
          - name: team2
            key_sha256: {sha(TEAM2)}
            group: team2
        """
    )


def workload(rng: random.Random, n: int) -> list[tuple[str, dict[str, Any]]]:
    """`n` calls: half images, half videos, fields drawn at random."""
    calls: list[tuple[str, dict[str, Any]]] = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.25:
            calls.append(
                (IMAGES, {"model": "openai/gpt-image-1", "quality": rng.choice(QUALITIES), "size": rng.choice(SIZES)})
            )
        elif pick < 0.5:
            calls.append(
                (IMAGES, {"model": "openai/dall-e-3", "quality": rng.choice(QUALITIES), "size": rng.choice(SIZES[:3])})
            )
        elif pick < 0.75:
            calls.append((VIDEOS, {"model": "openai/sora-2", "seconds": rng.randint(4, 12)}))
        else:
            calls.append((VIDEOS, {"model": "google/veo-3.1", "seconds": rng.randint(4, 12)}))
    return calls


def micros(usd: str | None) -> int:
    return 0 if usd is None else int(Decimal(usd) * 1_000_000)


class Access(logging.Handler):
    """The access log lines, parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))

    @classmethod
    def install(cls) -> Access:
        access = cls()
        log = logging.getLogger("spend_guard.access")
        log.addHandler(access)
        log.setLevel(logging.INFO)
        return access

    def remove(self) -> None:
        logging.getLogger("spend_guard.access").removeHandler(self)


@contextmanager
def proxy(up: StandIn, holds: str, min_observations: int = MIN_OBSERVATIONS) -> Iterator[TestClient]:
    with up.lock:
        up.credits_remaining_micros = 10**13  # $10M: the account never runs short
    server = fakeredis.FakeServer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(policy_text(holds, min_observations))
        settings = Settings(policy=str(path), upstream=up.url)
        app = create_app(
            settings, policy=load_policy(str(path)), redis_factory=lambda: fakeredis.FakeAsyncRedis(server=server)
        )
        with TestClient(app, raise_server_exceptions=False) as client:
            rt = app.runtime
            assert rt is not None and client.portal is not None
            assert client.portal.call(rt.refresher.refresh_credits)
            assert client.portal.call(rt.refresher.refresh_models)
            yield client


def send(client: TestClient, token: str, path: str, fields: dict[str, Any], standin: str = "") -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if standin:
        headers["X-Standin"] = standin
    return client.post(path, json={"prompt": "a lighthouse", **fields}, headers=headers)


def ratios(lines: list[dict[str, Any]], route: str) -> list[float]:
    return [
        micros(line["hold_usd"]) / micros(line["cost_usd"])
        for line in lines
        if line["route"] == route and line["decision"] == "allowed" and micros(line["cost_usd"]) > 0
    ]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mixed(
    up: StandIn, holds: str, calls: int, seed: int, access: Access, min_observations: int = MIN_OBSERVATIONS
) -> dict[str, Any]:
    rng = random.Random(seed)
    with proxy(up, holds, min_observations) as client:
        for path, fields in workload(rng, calls):  # warm-up
            send(client, WARM, path, fields)
        access.lines.clear()
        for path, fields in workload(rng, calls):
            response = send(client, WARM, path, fields)
            assert response.status_code == 200 and "error" not in response.json(), response.text
        lines = list(access.lines)
        underheld = sum(1 for line in lines if micros(line["cost_usd"]) > micros(line["hold_usd"]))
        solo = one_key_day(client, rng, access)
        team4 = at_once(client, up, TEAM, lambda: (VIDEOS, {"model": "openai/sora-2", "seconds": 4}))
        team_mixed = at_once(
            client, up, TEAM2, lambda: (VIDEOS, {"model": "openai/sora-2", "seconds": rng.randint(4, 12)})
        )
    result = {"underheld": underheld, **solo, "team_4s": team4, "team_4_12s": team_mixed}
    for name, route in (("images", IMAGES), ("video", VIDEOS)):
        found = ratios(lines, route)
        result[name] = (statistics.median(found), pct(found, 0.99), len(found))
    return result


def one_key_day(client: TestClient, rng: random.Random, access: Access) -> dict[str, Any]:
    """Image calls of the workload from the $1.00/day key until the first refusal (a video call
    costs more than the whole budget), beside how many of the same calls, in the same order, the
    budget could have paid for (their costs from the stand-in's tiers)."""
    calls = [call for call in workload(rng, 10_000) if call[0] == IMAGES]
    admitted = 0
    for path, fields in calls:
        if send(client, SOLO, path, fields).status_code != 200:
            break
        admitted += 1
    payable, total = 0, 0
    for _, fields in calls:
        total += tier_micros(fields)
        if total > 1_000_000:
            break
        payable += 1
    return {"solo_admitted": admitted, "solo_payable": payable}


def tier_micros(fields: dict[str, Any]) -> int:
    """What the stand-in charges an image call of the workload, as ImageRouter rounds it."""
    _, price = TIERED_PRICES[fields["model"]]
    params = CalcParams("auto", fields.get("size", "auto"), 0, fields.get("quality", "auto"))
    return math.ceil(price(params) * 10000) * 100


def at_once(client: TestClient, up: StandIn, token: str, next_call: Any) -> int:
    """Gated calls from a team key, one after another, each left in flight, until one is refused."""
    before = up.generation_calls
    results: list[int] = []
    threads = []
    gate = f"at-once-{token[-8:]}-{before}"
    while True:
        path, fields = next_call()
        done = threading.Event()
        started = up.generation_calls

        def run(path: str = path, fields: dict[str, Any] = fields, done: threading.Event = done) -> None:
            results.append(send(client, token, path, fields, standin=f"gate={gate}").status_code)
            done.set()
            up.wake()

        thread = threading.Thread(target=run)
        threads.append(thread)
        thread.start()
        # Either the stand-in sees it (admitted, now waiting at the gate) or the guard refused it.
        up.wait_until(lambda done=done, started=started: done.is_set() or up.generation_calls > started)
        if done.is_set() and results[-1] != 200:
            break
    admitted = up.generation_calls - before
    up.release(gate)
    for thread in threads:
        thread.join()
    return admitted


def price_rise(
    up: StandIn, calls: int, seed: int, access: Access, min_observations: int = MIN_OBSERVATIONS
) -> dict[str, Any]:
    """Every tier rises by half while 8 calls are in flight, after a warm-up under observed. The
    bound: an under-hold is a call in flight at the rise, or the first call of its signature
    admitted after it (its settle raises the learned value for the next)."""
    rng = random.Random(seed)
    with proxy(up, "observed", min_observations) as client:
        work = workload(rng, calls)
        for path, fields in work:
            send(client, WARM, path, fields)
        later = workload(rng, max(100, calls // 5))
        access.lines.clear()
        gate = "rise"
        threads = [
            threading.Thread(target=send, args=(client, WARM, path, fields, f"gate={gate}"))
            for path, fields in work[:8]
        ]
        start = up.generation_calls
        for thread in threads:
            thread.start()
        up.wait_for_requests(start + len(threads))
        up.price_by_request(factor=1.5)
        up.release(gate)
        for thread in threads:
            thread.join()
        in_flight = [line for line in access.lines if line["decision"] == "allowed"]
        seen: set[str] = set()
        beyond_bound = first_after = excess_after = underheld_after = 0
        for path, fields in later:
            access.lines.clear()
            send(client, WARM, path, fields)
            line = access.lines[-1]
            cost, hold = micros(line["cost_usd"]), micros(line["hold_usd"])
            signature = json.dumps(fields, sort_keys=True)
            first = signature not in seen
            seen.add(signature)
            first_after += first
            if cost > hold:
                underheld_after += 1
                excess_after += cost - hold
                beyond_bound += not first
    flight_over = [micros(x["cost_usd"]) - micros(x["hold_usd"]) for x in in_flight]
    excess = excess_after + sum(d for d in flight_over if d > 0)
    return {
        "underheld": underheld_after + sum(1 for d in flight_over if d > 0),
        "in_flight": len(in_flight),
        "signatures": first_after,
        "excess_usd": excess / 1e6,
        "beyond_bound": beyond_bound,
        "calls": len(in_flight) + len(later),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls in the warm-up and in the measured run")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    access = Access.install()
    logging.getLogger("spend_guard").setLevel(logging.ERROR)
    with StandIn(tiered_prices=True) as up:
        os.environ["IMAGEROUTER_API_KEY"] = up.account_key  # the stand-in's own account key
        for holds in ("max", "observed"):
            up.reset()
            r = mixed(up, holds, args.calls, args.seed, access)
            print(f"holds: {holds}")
            for name in ("images", "video"):
                median, p99, n = r[name]
                print(f"  {name:6} hold/cost median {median:.3f}  p99 {p99:.3f}  ({n} calls)")
            print(f"  under-holds while prices are stable: {r['underheld']}")
            print(
                f"  $1.00/day key: {r['solo_admitted']} calls admitted before the first refusal; "
                f"the budget could pay for {r['solo_payable']}"
            )
            print(f"  $12.00/day team, sora-2 at once: {r['team_4s']} (4 s), {r['team_4_12s']} (4-12 s)")
        up.reset()
        rise = price_rise(up, args.calls, args.seed, access)
        print(
            f"price rise x1.5 with {rise['in_flight']} calls in flight, then {rise['calls'] - rise['in_flight']} calls "
            f"over {rise['signatures']} signatures: {rise['underheld']} under-holds, ${rise['excess_usd']:.4f} charged "
            f"beyond holds; under-holds outside the bound (not in flight, not a signature's first call after the "
            f"rise): {rise['beyond_bound']}"
        )


if __name__ == "__main__":
    main()
