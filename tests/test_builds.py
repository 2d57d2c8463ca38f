"""Pinned builds: the lock files cover pyproject.toml, the image and CI install from them, and the
bench runs on a Redis of its own (docs/development.md#the-lock-files)."""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# `name==version [; marker] \` then one `--hash=sha256:...` line per file of that release.
PIN_RE = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;]+)[^\n\\]*((?:\\\n\s*--hash=sha256:[0-9a-f]{64}\s*)*)", re.MULTILINE)


def pins(name: str) -> dict[str, tuple[Version, int]]:
    """`requirements/<name>`: each pinned package's version and how many hashes it has."""
    text = (ROOT / "requirements" / name).read_text()
    return {canonicalize_name(m[1]): (Version(m[2]), m[3].count("--hash=sha256:")) for m in PIN_RE.finditer(text)}


def project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize(("lock", "extras"), [("runtime.txt", ()), ("test.txt", ("test",))], ids=["runtime", "test"])
def test_every_dependency_of_pyproject_is_pinned_in_the_lock_with_hashes(lock: str, extras: tuple[str, ...]) -> None:
    meta = project()["project"]
    assert isinstance(meta, dict)
    wanted = list(meta["dependencies"]) + [r for extra in extras for r in meta["optional-dependencies"][extra]]
    locked = pins(lock)
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in requirements/{lock}: run bash requirements/lock.sh"
        version, hashes = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/{lock} pins {name}=={version}, outside pyproject.toml's {requirement}"
        )
    assert all(hashes for _, hashes in locked.values()), f"a pin in requirements/{lock} has no --hash"
    if extras:
        assert "lupa" in locked  # fakeredis[lua]: the store's real Lua scripts run in the fake store


def test_the_build_lock_pins_the_build_backend_of_pyproject() -> None:
    locked = pins("build.txt")
    build = project()["build-system"]
    assert isinstance(build, dict)
    for line in build["requires"]:
        requirement = Requirement(line)
        version, hashes = locked[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version) and hashes


def test_the_image_installs_only_from_the_locks() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/runtime.txt" in dockerfile
    assert "--require-hashes -r requirements/build.txt" in dockerfile
    # Nothing resolved at build time: every other pip install is the project's own wheel, without deps.
    installs = re.findall(r"pip install[^\n&]*", dockerfile)
    assert all("--require-hashes" in line or "--no-deps" in line for line in installs), installs
    assert "requirements/" not in (ROOT / ".dockerignore").read_text().split("\n", 1)[1]


def test_ci_installs_the_lock_before_the_readmes_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = "pip install -e '.[test]' && python -m pytest"
    assert f"```sh\n{command}\n```" in readme
    assert "```sh\npip install -e . && spend-guard serve --demo\n```" in readme
    lock = ci.index("pip install -q --require-hashes -r requirements/test.txt\n")
    assert lock < ci.index(f"\n{command}\n")


def _bench_procs() -> object:
    spec = importlib.util.spec_from_file_location("bench_procs", ROOT / "bench" / "procs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_procs"] = module
    spec.loader.exec_module(module)
    return module


def test_the_bench_names_no_shared_redis() -> None:
    for path in (ROOT / "bench").glob("*.py"):
        assert ":6379" not in path.read_text(), f"{path.name} names the Redis on port 6379"


@pytest.mark.system
def test_the_bench_starts_a_redis_of_its_own_on_a_free_port_and_stops_it(tmp_path: Path) -> None:
    procs_module = _bench_procs()
    procs = procs_module.Procs(str(tmp_path))  # type: ignore[attr-defined]
    try:
        url = procs_module.start_redis(procs, {"PATH": "/usr/bin:/bin:/usr/local/bin"})  # type: ignore[attr-defined]
    except RuntimeError as exc:
        if "not found" in str(exc):
            pytest.skip(str(exc))
        raise
    try:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port != 6379 and url.startswith("redis://127.0.0.1:")
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"DBSIZE\r\n")
            assert conn.recv(16) == b":0\r\n"  # a fresh server: nothing of anyone else's in it
    finally:
        procs.stop_all()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
