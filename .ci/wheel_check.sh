#!/usr/bin/env bash
# The installed wheel, outside the repository: spon run / pull / generate / eval / bench / sweep.
#   pip wheel . --no-deps -w dist
#   python3 -m venv wheel-venv && wheel-venv/bin/pip install torch==2.13.0 \
#     && wheel-venv/bin/pip install -c constraints.txt "dist/spon-0.1.0-py3-none-any.whl[all]"
#   SPON_ASSETS=../shared/assets bash .ci/wheel_check.sh wheel-venv
set -euo pipefail
VENV=$(cd "${1:?usage: wheel_check.sh VENV}" && pwd)
: "${SPON_ASSETS:?set SPON_ASSETS to the shared assets directory}"
SPON_ASSETS=$(cd "$SPON_ASSETS" && pwd)  # the checks run in a temporary directory
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
A=$SPON_ASSETS; S=$VENV/bin/spon
W=$(mktemp -d) && cd "$W"
echo "== run";   $S -q run --out r --eval-text $A/data/tinystories/sample.txt --steps 4 --calib-blocks 16 --calib-len 32 --batch-size 8 | tail -4
echo "== pull";  $S -q pull models:/spon-stories260K-s50-all@candidate --out pulled --tracking-uri sqlite:///$PWD/out/mlflow.db
echo "== generate"; $S -q generate pulled --prompt "Once upon a time" --max-new-tokens 8
echo "== eval";  $S -q eval r/fused --variants dense,spon --tasks arc_easy --limit 8 --out ev | tail -2
echo "== bench"; $S bench --device cpu --shapes 256x256 --dtypes fp32 --batches 1 --sparsities 0,0.5 --no-plot --reps 3 --min-time 0.05 --threads 1 --out b | tail -3
echo "== sweep"; $S -q sweep --sparsities 0.3,0.5 --steps 2 --calib-blocks 8 --calib-len 32 --batch-size 4 --out sw --dask-workers 1 | tail -3
echo "WHEEL CHECK OK ($W)"
