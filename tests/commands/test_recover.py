"""`spend-guard store recover` acts only on a store that lost its state (unless --force), says
what it wrote by budget name and date, and a recovery never sends again a threshold alert already
sent in the window. Real Redis (the command runs against a URL). See docs/operations.md."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from click.testing import CliRunner

from proxy.cli import main
from proxy.windows import format_ms, to_ms
from tests.ops.test_alerts import SECRET, SECRET_ENV, policy
from tests.store.test_amnesia import POLICY, forget
from tests.support.constants import KEY_A
from tests.support.standin import key_row
from tests.support.webhook_receiver import Receiver

pytestmark = pytest.mark.real
REAL = [pytest.param("real", marks=pytest.mark.real)]


def recover(p, url: str, *args: str):
    return CliRunner().invoke(main, ["store", "recover", "--policy", p.app.settings.policy, "--redis-url", url, *args])


def spent(p, scope: str) -> str:
    me = p.client.get("/-/me", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    return str(next(s for s in me["scopes"] if s["scope"] == scope)["spent_usd"])


@pytest.mark.parametrize("store_target", REAL, indirect=True)
def test_recover_writes_nothing_to_a_store_that_lost_nothing_unless_forced(make_proxy, up, store_target):
    p = make_proxy(POLICY)
    assert p.generate(standin="cost=0.3").status_code == 200
    refused = recover(p, store_target.url, "--seed", "key:alice:day=0")
    assert refused.exit_code == 1, refused.output
    assert "has not lost its state; nothing written" in refused.output
    assert spent(p, "budget:key:alice:day") == "0.3000"  # untouched
    refused = recover(p, store_target.url, "--accept-loss")
    assert refused.exit_code == 1 and spent(p, "budget:key:alice:day") == "0.3000"
    forced = recover(p, store_target.url, "--seed", "key:alice:day=0.05", "--force")
    assert forced.exit_code == 0, forced.output
    assert "had not lost its state; written anyway (--force)" in forced.output
    assert spent(p, "budget:key:alice:day") == "0.0500"


@pytest.mark.parametrize("store_target", REAL, indirect=True)
def test_recover_names_budgets_and_dates_never_fingerprints_or_milliseconds(make_proxy, up, store_target):
    p = make_proxy(POLICY)
    assert p.generate(standin="cost=0.3").status_code == 200
    forget(p)
    assert p.generate(standin="cost=0.3").status_code == 503
    ok = recover(p, store_target.url, "--seed", "key:alice:day=0.30")
    assert ok.exit_code == 0, ok.output
    today = format_ms(to_ms(dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), dt.UTC)))
    lines = ok.output.splitlines()
    assert re.fullmatch(
        r"recovered: the store's state was emptied \(noticed \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\); "
        r"local budgets are enforced again",
        lines[0],
    ), lines[0]
    assert lines[1:] == [f"  budget:key:alice:day (window from {today}): spent $0.3000"]
    assert "key-fp" not in ok.output and not re.search(r"\d{12}", ok.output)


@pytest.mark.parametrize("store_target", REAL, indirect=True)
def test_alerts_sent_before_a_loss_are_not_sent_again_after_recovery(make_proxy, up, store_target, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    today = dt.datetime.now(dt.UTC).date()
    # alice's ImageRouter key: $4.00 a day, $2.20 spent (55 %); her local budget: $1.00 a day.
    up.key_rows = [
        key_row(
            "key-a",
            "alice",
            spend_limit="4.00",
            period="day",
            period_spend="2.2000",
            period_start=f"{today.isoformat()}T00:00:00Z",
        )
    ]
    up.key_ids = {KEY_A: "key-a"}
    with Receiver() as receiver:
        text = policy(receiver.url, key="    api_key_id: key-a")
        first, second = make_proxy(text), make_proxy(text)
        for _ in range(6):
            assert first.generate(standin="cost=0.1").status_code == 200
        sent = sorted((d.event["scope"], d.event["threshold"]) for d in receiver.wait_for(2))
        assert sent == [("budget:key:alice:day", 0.5), ("key:alice:day", 0.5)]
        first.run(first.app.alerts.drain)
        assert second.run(second.app.alerts.evaluate) == []  # a sweep: it learns the marks first claimed
        first.client.__exit__(None, None, None)  # only the second instance lives through the loss
        forget(second)
        assert second.generate(standin="cost=0.1").status_code == 503  # the loss is noticed
        second.refresh()  # a snapshot again: alice's key row is at 55 % once more
        assert second.run(second.app.alerts.evaluate) == []  # nothing is claimed while the state is lost
        ok = recover(second, store_target.url, "--seed", "key:alice:day=0.60")
        assert ok.exit_code == 0, ok.output
        second.run(second.runtime.refresher.tick)  # the next refresh round sees the marker lifted
        assert second.run(second.app.alerts.evaluate) == []  # neither 50 % alert again
        for _ in range(2):
            assert second.generate(standin="cost=0.1").status_code == 200
        second.run(second.app.alerts.drain)
        got = [(d.event["scope"], d.event["threshold"]) for d in receiver.deliveries[2:]]
        assert got == [("budget:key:alice:day", 0.8)]  # alerts go on: 0.80 of $1.00 is new
