#!/usr/bin/env bash
# Runs the test suite (installing into .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
exec python -m pytest -q "$@"
