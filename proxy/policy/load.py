"""Loading a policy: read the files, parse, check and build (check.py, build.py), and hand back
the data model of model.py. Each module of `proxy.policy` imports only downwards:

    load  ->  build  ->  check  ->  model (the data model)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from proxy.errors import PolicyError
from proxy.policy.build import Builder
from proxy.policy.check import parse_yaml
from proxy.policy.model import POLICY_SUFFIXES, Policy


def policy_files(path: str | os.PathLike[str]) -> list[str]:
    """The files `path` names: itself, or a directory's `*.yaml`/`*.yml` in sorted order."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        return [root]
    names = sorted(
        name
        for name in os.listdir(root)
        # Dot files are editor backups and lock files, not policies.
        if name.endswith(POLICY_SUFFIXES) and not name.startswith(".")
    )
    return [os.path.join(root, name) for name in names if os.path.isfile(os.path.join(root, name))]


def _version(contents: Iterable[tuple[str, bytes]]) -> str:
    """A policy's version: a digest of each file's name and bytes, in order."""
    digest = hashlib.sha256()
    for file, content in contents:
        for part in (os.path.basename(file).encode(), content):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:12]


def file_version(path: str | os.PathLike[str]) -> str | None:
    """The version the policy files at `path` have now, valid or not (what `load_policy` would
    call them): compared with the enforced policy's version, it says whether the files on disk
    are what is enforced. None when they cannot be read."""
    contents = []
    try:
        for file in policy_files(path):
            with open(file, "rb") as stream:
                contents.append((file, stream.read()))
    except OSError:
        return None
    return _version(contents) if contents else None


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a policy file, or merge every policy file in a directory, and validate it.

    Raises `PolicyError` listing every problem found, each `<file>: <location>: <message>`.
    """
    root = os.fspath(path)
    if not os.path.exists(root):
        raise PolicyError([f"{root}: no such file or directory"])
    files = policy_files(root)
    if not files:
        raise PolicyError([f"{root}: directory has no *.yaml or *.yml policy files"])
    problems: list[str] = []
    builder = Builder(problems)
    contents: list[tuple[str, bytes]] = []
    for file in files:
        try:
            with open(file, "rb") as stream:
                content = stream.read()
        except OSError as exc:
            problems.append(f"{file}: cannot read: {exc.strerror}")
            continue
        contents.append((file, content))
        data = parse_yaml(file, content, problems)
        if data is not None:
            builder.add(file, data)
    policy = builder.finish(tuple(files), _version(contents))
    if problems:
        raise PolicyError(problems)
    return policy
