"""`spend-guard serve --demo`: a working proxy with no account and no Redis, as a newcomer runs it.

One demo process serves the module (its start is the slow part); each test uses its own demo key
or model so they do not depend on each other's spend, except where noted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.commands.demo import KEYS
from tests.support.served import free_port, wait_until

pytestmark = pytest.mark.system

ALICE, BOB = (key.token for key in KEYS)
IMAGES = "/v1/openai/images/generations"


class Demo:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = tmp / "stdout.log", tmp / "stderr.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPEND_GUARD_", "IMAGEROUTER_"))}
        env["XDG_STATE_HOME"] = str(tmp / "state-home")  # the demo must not need (or touch) it
        # Set for real serving (the image sets it): the demo sets it aside for its own policy.
        env["SPEND_GUARD_POLICY"] = str(tmp / "no-such-policy.yaml")
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(self.port), *args],
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        wait_until(self._ready, 30, f"the demo on {self.url}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"demo exited with {self.proc.returncode}: {self.err.read_text()}")
        try:
            return httpx.get(self.url + "/-/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode

    def image(self, token: str, model: str, **headers: str) -> httpx.Response:
        return httpx.post(
            self.url + IMAGES,
            json={"model": model, "prompt": "a lighthouse"},
            headers={"Authorization": f"Bearer {token}", **headers},
            timeout=30,
        )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(tmp_path_factory.mktemp("demo"), "--log-format", "json")
    try:
        yield running
    finally:
        running.stop()


def test_demo_prints_both_keys_and_a_call_to_try(demo: Demo) -> None:
    # The banner goes to stderr before the JSON log lines start.
    banner = demo.err.read_text()
    assert ALICE in banner and BOB in banner
    assert "spend limit $0.10 per day" in banner
    assert f"curl -s {demo.url}{IMAGES}" in banner


def test_demo_allows_a_call_within_the_limit_and_refuses_one_beyond_it(demo: Demo) -> None:
    allowed = demo.image(BOB, "test/test")
    assert allowed.status_code == 200
    assert allowed.content.startswith(b" ")  # ImageRouter's heartbeat came first
    assert allowed.json()["cost"] == 0.0
    refused = demo.image(BOB, "openai/gpt-image-1")
    assert refused.status_code == 402
    assert refused.json()["error"]["type"] == "spend_limit_exceeded"
    assert "spend limit of $0.1000 per day" in refused.json()["error"]["message"]
    assert refused.headers["X-Spend-Guard-Scope"] == "key:day"


def test_demo_local_budget_counts_what_the_upstream_charged(demo: Demo) -> None:
    assert demo.image(ALICE, "google/gemini-2.5-flash").json()["cost"] == 0.039
    me = httpx.get(demo.url + "/-/me", headers={"Authorization": f"Bearer {ALICE}"}).json()
    budget = next(s for s in me["scopes"] if s["scope"] == "budget:key:alice:day")
    assert budget["limit_usd"] == "1.0000"
    assert budget["spent_usd"] == "0.0390"


def test_demo_streams_chat_as_server_sent_events(demo: Demo) -> None:
    body = {"model": "openai/gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream(
        "POST",
        demo.url + "/v1/openai/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert '"cost"' in text and text.rstrip().endswith("data: [DONE]")


def test_openai_sdk_sees_a_refusal_as_api_status_error_402_and_does_not_retry(demo: Demo) -> None:
    client = openai.OpenAI(base_url=demo.url + "/v1/openai", api_key=BOB, max_retries=2)
    with pytest.raises(openai.APIStatusError) as refused:
        client.images.generate(model="google/veo-3.1", prompt="a lighthouse")
    assert refused.value.status_code == 402
    assert isinstance(refused.value.body, dict) and refused.value.body["type"] == "spend_limit_exceeded"
    lines = [json.loads(line) for line in demo.out.read_text().splitlines()]
    tries = [line for line in lines if line.get("model") == "google/veo-3.1"]
    assert len(tries) == 1, tries  # max_retries=2, yet one call: 402 is not retried


def test_json_log_format_makes_every_line_one_json_object(demo: Demo) -> None:
    demo.image(ALICE, "test/test", **{"User-Agent": "log-check/1.0"})
    # The access line is written once the call is settled, just after its response went out.
    wait_until(lambda: "log-check/1.0" in demo.out.read_text(), 10, "the call's access line")
    records = [json.loads(line) for line in demo.out.read_text().splitlines()]  # raises on a non-JSON line
    assert any(r.get("logger") == "uvicorn.error" for r in records)  # uvicorn's own lines too
    assert any(r.get("logger") == "spend_guard" for r in records)  # and the proxy's
    access = [r for r in records if r.get("decision") and r.get("user_agent") == "log-check/1.0"]
    assert access[-1]["client"].startswith("127.0.0.1:")
    # Nothing but the banner (before logging starts) is plain text, on stderr.
    assert not [line for line in demo.err.read_text().splitlines() if line.startswith(("INFO", "{"))]


def test_json_log_format_covers_the_worker_supervisor_and_its_workers(tmp_path: Path) -> None:
    demo = Demo(tmp_path, "--log-format", "json", "--workers", "2")
    try:
        # /-/readyz answered for the worker that took its connection; the call may reach the other.
        wait_until(lambda: demo.out.read_text().count("spend guard ready") >= 2, 30, "both workers ready")
        assert demo.image(BOB, "test/test").status_code == 200
        wait_until(lambda: '"decision":"allowed"' in demo.out.read_text(), 10, "the call's access line")
    finally:
        assert demo.stop() == 0
    records = [json.loads(line) for line in demo.out.read_text().splitlines()]
    assert {r["logger"] for r in records if "logger" in r} >= {"uvicorn.error", "spend_guard"}
    assert not [line for line in demo.err.read_text().splitlines() if line.startswith(("INFO", "WARNING", "{"))]


def test_demo_refuses_an_upstream_of_its_own(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--demo", "--upstream", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "the demo brings its own upstream; drop --upstream" in result.stderr
