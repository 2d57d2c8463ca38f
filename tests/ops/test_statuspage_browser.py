"""The status page in a real headless Chromium (docs/status-page.md): a served proxy, the browser
signing in with the admin token at the Basic prompt, the policy's budgets with the right numbers,
the page updating itself after calls, and no console error. Under CI a missing chromium fails.

The screenshot is left at SCREENSHOT for a person to look at."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from tests.support.cdp import Page, chromium_page
from tests.support.constants import KEY_A, KEY_B
from tests.support.policies import budget, flow, key_entry, policy_yaml
from tests.support.served import RedisServer, ServedProxy

pytestmark = pytest.mark.system

SCREENSHOT = "/tmp/spend-guard-status.png"
ADMIN_TOKEN = "sg-admin-" + "k" * 40
ROWS = """[...document.querySelectorAll('#scopes tr[data-scope]')].map(r => ({
  scope: r.dataset.scope, level: r.className, pct: r.querySelector('.pct').textContent,
  spent: r.querySelector('td.spent').textContent, held: r.querySelector('td.held').textContent,
  limit: r.querySelector('td.limit').textContent, remaining: r.querySelector('td.remaining').textContent,
  resets: r.cells[7].textContent, bar: r.querySelector('.bar .spent').style.width}))"""
REFUSALS = "[...document.querySelectorAll('#refusals tr')].map(r => r.textContent)"


def refreshed_after(count: int) -> str:
    """A promise that resolves once the page has redrawn itself more than `count` times."""
    return f"""new Promise((resolve, reject) => {{
      const done = () => Number(document.body.dataset.refreshes) > {count};
      if (done()) return resolve(Number(document.body.dataset.refreshes));
      const watch = new MutationObserver(() => {{
        if (done()) {{ watch.disconnect(); resolve(Number(document.body.dataset.refreshes)); }}
      }});
      watch.observe(document.body, {{attributes: true, attributeFilter: ['data-refreshes']}});
      setTimeout(() => reject(new Error('the page did not refresh itself within 15 s')), 15000);
    }})"""


def policy(directory: Path) -> Path:
    path = directory / "policy.yaml"
    path.write_text(
        policy_yaml(
            account=flow(name="browser", refresh_s=1, max_staleness_s=300),
            admin=flow(token_sha256=f"'{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}'"),
            groups=[flow(name="design", budgets=[budget("2.30", "month")])],
            keys=[
                key_entry(group="design", budgets=[budget("2.00", "day")]),
                key_entry("bob", token=KEY_B, budgets=[budget("0.01", "week")]),
            ],
        )
    )
    return path


def generate(
    proxy: ServedProxy, token: str, cost: str | None = None, model: str = "openai/gpt-image-1"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", **({"X-Standin": f"cost={cost}"} if cost else {})}
    body = {"model": model, "prompt": "a cat"}
    return httpx.post(proxy.url + "/v1/openai/images/generations", json=body, headers=headers, timeout=30)


async def rows(page: Page) -> dict[str, dict[str, str]]:
    return {row["scope"]: row for row in await page.evaluate(ROWS)}


async def test_status_page_in_a_browser_shows_the_budgets_and_updates_after_calls(up, tmp_path: Path) -> None:
    with RedisServer() as redis, ServedProxy(policy(tmp_path), up.url, redis.url) as proxy:
        # alice's day budget: 85 %, her group's 74 % (a cost above its hold raises only that model's next holds)
        assert generate(proxy, KEY_A, cost="1.70", model="google/gemini-2.5-flash").status_code == 200
        async with chromium_page(credentials=("ops", ADMIN_TOKEN)) as page:
            loaded = page.event("Page.loadEventFired")
            await page.call("Page.navigate", url=proxy.url + "/-/status?every=1")
            await loaded
            seen = await page.evaluate(refreshed_after(0))
            assert page.auth_challenges >= 1  # the browser was asked, and signed in with the token

            before = await rows(page)
            assert set(before) == {
                "account",
                "budget:key:alice:day",
                "budget:group:design:month",
                "budget:key:bob:week",
            }
            day = before["budget:key:alice:day"]
            assert (day["spent"], day["held"], day["limit"], day["remaining"], day["pct"]) == (
                "$1.7000",
                "$0.0000",
                "$2.0000",
                "$0.3000",
                "85 %",
            )
            assert day["level"] == "amber" and day["bar"] == "85%" and day["resets"].startswith("in ")
            month = before["budget:group:design:month"]
            assert (month["spent"], month["limit"], month["pct"], month["level"]) == (
                "$1.7000",
                "$2.3000",
                "74 %",
                "ok",
            )
            assert before["budget:key:bob:week"]["spent"] == "$0.0000"
            # The credits snapshot is refetched every second: the balance before or after that call.
            assert await page.evaluate("document.getElementById('credits').textContent") in ("$100.0000", "$98.3000")
            assert await page.evaluate("document.getElementById('holds').textContent") == "0"
            assert await page.evaluate(REFUSALS) == ["none"]

            # A call that uses alice's day budget up, and one bob's budget refuses: the page,
            # left alone, shows both at its next refresh.
            assert generate(proxy, KEY_A, cost="0.30").status_code == 200
            refused = generate(proxy, KEY_B)
            assert refused.status_code == 402
            await page.evaluate(refreshed_after(seen))
            after = await rows(page)
            day = after["budget:key:alice:day"]
            assert (day["spent"], day["remaining"], day["pct"], day["level"], day["bar"]) == (
                "$2.0000",
                "$0.0000",
                "100 %",
                "red",
                "100%",
            )
            month = after["budget:group:design:month"]
            assert (month["spent"], month["pct"], month["level"]) == ("$2.0000", "87 %", "amber")
            (refusal,) = await page.evaluate(REFUSALS)
            assert "bob" in refusal and "budget:key:bob:week" in refusal and "402 spend_limit_exceeded" in refusal
            assert await page.evaluate("document.getElementById('refusal-count').textContent") == "1"
            await page.screenshot(SCREENSHOT)
            assert page.errors == []
        assert ADMIN_TOKEN not in proxy.output()
    assert Path(SCREENSHOT).stat().st_size > 10_000


async def test_the_browser_without_the_token_gets_no_page(up, tmp_path: Path) -> None:
    with RedisServer() as redis, ServedProxy(policy(tmp_path), up.url, redis.url) as proxy:
        async with chromium_page(credentials=None) as page:
            loaded = page.event("Page.loadEventFired")
            await page.call("Page.navigate", url=proxy.url + "/-/status")
            await loaded
            text = await page.evaluate("document.body.innerText")
            assert "admin token" in text and "Account credits" not in text
            # The console-error check sees what a browser logs (so the empty list above means something).
            assert [error for error in page.errors if "status of 401" in error]
