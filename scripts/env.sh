#!/usr/bin/env bash
# Creates .venv and installs dfkd into it (editable, with the dev extra) when missing or when
# pyproject.toml changed since the last install. Sourced by quickstart.sh and test.sh.
# DFKD_TORCH overrides the torch/torchvision pair installed first (default: the pair this
# project is tested with); set DFKD_TORCH="" to let pip choose.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python="${PYTHON:-python3}"
torch_spec="${DFKD_TORCH-torch==2.14.1 torchvision==0.29.1}"
stamp="$venv/.dfkd-installed"
want="$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1) $torch_spec"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing dfkd into $venv ..." >&2
    if [ -n "$torch_spec" ]; then
        # shellcheck disable=SC2086
        "$venv/bin/pip" install -q $torch_spec 2>&1 | grep -v "^WARNING: Location" >&2 || true
    fi
    "$venv/bin/pip" install -q -e "$repo[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$venv/bin/python" -c "import dfkd, generators, torch, torchvision, kornia" \
        || { echo "dfkd: installation into $venv failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
