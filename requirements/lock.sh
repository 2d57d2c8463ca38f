#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (docs/development.md#the-lock-files).
#
#   bash requirements/lock.sh                              # after changing a dependency in pyproject.toml
#   bash requirements/lock.sh --upgrade                    # everything to its newest allowed release
#   bash requirements/lock.sh --upgrade-package aiohttp    # one package (repeatable)
#
# Needs uv (pip install uv). The files it writes are pip requirements files with a sha256 for every
# file of every pinned release, for every platform (--universal) and Python 3.11 on: installing them
# needs only pip (`pip install --require-hashes -r requirements/test.txt`), never uv.
set -euo pipefail
cd "$(dirname "$0")/.."
compile() {
  uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command "bash requirements/lock.sh" "$@"
}
compile pyproject.toml -o requirements/runtime.txt "$@"          # the image
compile pyproject.toml --extra test -o requirements/test.txt "$@" # CI and development
compile requirements/build.in -o requirements/build.txt "$@"     # the image's build stage
