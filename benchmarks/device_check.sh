#!/usr/bin/env bash
# The GPU check, one command on a lent machine (one H100 or H200, an image with jax[cuda], flax,
# optax, orbax, torch and timm, no network), or CI-sized on the CPU:
#
#   bash benchmarks/device_check.sh          # GPU: small/medium/large at batch 1024, float32 and
#                                            # bfloat16, JAX vs PyTorch eager vs torch.compile,
#                                            # MFU against the card's datasheet bf16 peak (< 8 min)
#   bash benchmarks/device_check.sh --cpu    # the same code path, micro student, batch 8, jax vs
#                                            # torch eager (tests/test_device_check.py)
#
# Writes $OUT/device_check.jsonl (benchmarks/train_step.py and benchmarks/peak.py rows),
# $OUT/device_check.md (the table, benchmarks/report.py) and $OUT/environment.txt. OUT defaults to
# benchmarks/results/device_check. Packages the GPU image lacks travel as wheels in .whl/ (grain,
# array_record, ml_collections, portpicker) and our exact flax/optax/orbax pins in .whl/pins/; see
# benchmarks/README.md for the download command. They go to /tmp, never into the image's
# site-packages; the pins are used only if they import with the image's jax.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
OUT=${OUT:-benchmarks/results/device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ! "$PY" -c 'import grain, ml_collections' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tikd_site .whl/*.whl
  export PYTHONPATH=/tmp/tikd_site${PYTHONPATH:+:$PYTHONPATH}
fi
pinned_flax=$(sed -n 's/^flax==//p' requirements.txt)
if [ "$("$PY" -c 'import flax; print(flax.__version__)')" != "$pinned_flax" ] \
  && compgen -G ".whl/pins/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tikd_pins .whl/pins/*.whl
  if PYTHONPATH=/tmp/tikd_pins:${PYTHONPATH:-} "$PY" -c 'import jax, optax, orbax.checkpoint
from flax import nnx
nnx.Linear(2, 2, rngs=nnx.Rngs(0))(jax.numpy.ones((1, 2)))'; then
    export PYTHONPATH=/tmp/tikd_pins${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "# our flax/optax/orbax pins do not run with this jax: using the image's own" >&2
  fi
fi
# The JAX and PyTorch workers share one card: JAX must not take 75 % of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

{
  date -u
  uname -a
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
  "$PY" -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(), "| flax",
flax.__version__, "| optax", optax.__version__, "| torch", torch.__version__, "cuda",
torch.cuda.is_available())'
  echo "PYTHONPATH=${PYTHONPATH:-}"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

rows="$OUT/device_check.jsonl"
if [ "$mode" = "--cpu" ]; then
  "$PY" benchmarks/train_step.py --device cpu --sizes micro --batch 8 --runs 1 --warmup 0 \
    --dtypes float32,bfloat16 --frameworks jax,torch --peak measure --out "$rows"
else
  # Sizes in order; none starts after 330 s, so the whole check ends inside 8 minutes.
  timeout 470 "$PY" benchmarks/train_step.py --device gpu --sizes small,medium,large \
    --batch 1024 --runs 10 --large_runs 10 --warmup 2 --dtypes float32,bfloat16 \
    --frameworks jax,torch,torch_compile --peak measure --deadline_s 330 --out "$rows" \
    || echo "# train_step.py ended with code $? (rows so far are in $rows)" >&2
fi
"$PY" benchmarks/report.py table "$rows" | tee "$OUT/device_check.md"
