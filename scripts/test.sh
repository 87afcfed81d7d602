#!/usr/bin/env bash
# Runs the test suite (installing into .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
# Two workers (pytest-xdist): the end-to-end tests run on one torch thread each, so two of them
# fill two cores (measured on 2 cores: 714 s one at a time, 361 s with two). `-n 0` runs in-process.
exec python -m pytest -q -n 2 "$@"
