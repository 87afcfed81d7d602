#!/usr/bin/env bash
# The main job on the embedded default dataset (scikit-learn's digits): train a LeNet-5
# teacher, then distil it into LeNet-5-half without reading a single training image.
# Installs into .venv first if needed. METHOD picks the data-free method (default: dfq).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
out="${DFKD_OUT:-runs}"
method="${METHOD:-dfq}"
summary=$(dfkd teacher --config teacher/lenet5-digits --out "$out")
echo "teacher: $summary"
teacher="$(python -c 'import json, sys; print(json.loads(sys.argv[1])["run_dir"])' "$summary")/ckpt/final.pt"
# the recipe's budget is sized for ResNet teachers; a LeNet-5 teacher is matched long before its end:
# the run stops once the student is within 1% of its teacher. DFQ's 10 student steps an iteration
# become 5, its budget before ResNet teachers needed more.
extra=()
[ "$method" = dfq ] && extra=(phases.1.steps=5)
echo "student: $(dfkd distill --config "datafree/$method-digits" --teacher "$teacher" --out "$out" \
    train.stop_at.teacher_share=0.99 "${extra[@]}")"
echo "inspect: .venv/bin/tensorboard --logdir $out --samples_per_plugin images=10000"
