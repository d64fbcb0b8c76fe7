#!/usr/bin/env bash
# The GPU check, one command on a lent machine (one H100 or H200, an image with jax[cuda], flax,
# optax, orbax, torch and timm, no network), or CI-sized on the CPU:
#
#   bash benchmarks/device_check.sh          # GPU, under 10 minutes (BUDGET_S, 570 s), every
#                                            # part time-boxed within what is left:
#     1. steps: small/medium/large at batch 1024, float32 and bfloat16, JAX (our attention and
#        jax.nn.dot_product_attention's cuDNN core: jax_cudnn) vs PyTorch eager vs torch.compile,
#        MFU against the card's datasheet bf16 peak                    (benchmarks/train_step.py)
#     2. the sweep, small bfloat16, JAX alone, one process per point: XLA:GPU command buffers off,
#        the latency-hiding scheduler on, batch 2048 and 4096 (rows tagged with the point)
#     3. a jax.profiler trace of one bf16 step per size, top-15 ops  (benchmarks/profile_summary.py)
#     4. the real trainer, end to end with grain worker processes, against its step, with the
#        recipe's RandAugment on the host and on the device        (benchmarks/trainer_throughput.py)
#     5. the host stream per worker with RandAugment moved to the device, and the device's rate
#        for the moved work                                        (benchmarks/input_pipeline.py)
#     6. the device RandAugment against the Pillow host version, op by op, jitted on the GPU
#                                                   (tests/test_device_randaugment.py, with pytest)
#   bash benchmarks/device_check.sh --cpu    # the same code paths, micro student, batch 8, jax vs
#                                            # torch eager (tests/test_device_check.py)
#
# Writes to $OUT: device_check.jsonl (train_step.py and peak.py rows, sweep rows tagged),
# device_check.md (the table; the sweep table, each point against the defaults, kept when > 2 %
# faster: benchmarks/report.py), profile.jsonl / profile.md, trainer_throughput.jsonl and
# environment.txt. OUT defaults to benchmarks/results/device_check. Packages the GPU image lacks
# travel as wheels in .whl/ (grain, array_record, ml_collections, portpicker) and our exact
# flax/optax/orbax pins in .whl/pins/; see benchmarks/README.md for the download command. They go
# to /tmp, never into the image's site-packages; the pins are used only if they import with the
# image's jax.
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
# part SECONDS COMMAND...: runs a part time-boxed, and within what is left of the whole check's
# budget (BUDGET_S, default 570 s since the script started: one 10-minute device call); a part
# that fails or runs out of time says so and the check goes on (the rows it wrote are kept).
budget=${BUDGET_S:-570}
part() {
  local limit=$1
  shift
  local left=$((budget - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "# $(basename "$2") skipped: the check's ${budget}s are spent" >&2
    return
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  local code=0
  timeout "$limit" "$@" || code=$?
  if [ "$code" != 0 ]; then
    echo "# $(basename "$2") ended with code $code (124: its ${limit}s ran out)" >&2
  fi
}
if [ "$mode" = "--cpu" ]; then
  "$PY" benchmarks/train_step.py --device cpu --sizes micro --batch 8 --runs 1 --warmup 0 \
    --dtypes float32,bfloat16 --frameworks jax,torch --peak measure --out "$rows"
  "$PY" benchmarks/profile_summary.py --sizes micro --batch 8 --trace_dir "$OUT/profile" \
    --out "$OUT/profile.jsonl" --md "$OUT/profile.md"
  "$PY" benchmarks/trainer_throughput.py --size micro --batch 8 --steps 2 --rounds 1 \
    --train_examples 256 --eval_examples 64 --out "$OUT/trainer_throughput.jsonl"
  "$PY" benchmarks/trainer_throughput.py --size micro --batch 8 --steps 2 --rounds 1 \
    --train_examples 256 --eval_examples 64 --randaugment_on device \
    --out "$OUT/trainer_throughput.jsonl"
else
  # 1. Sizes in order; none starts after 120 s.
  part 200 "$PY" benchmarks/train_step.py --device gpu --sizes small,medium,large --batch 1024 \
    --runs 5 --large_runs 5 --warmup 2 --dtypes float32,bfloat16 \
    --frameworks jax,jax_cudnn,torch,torch_compile --peak measure --deadline_s 120 --out "$rows"
  # 2. The sweep: one process per point (XLA_FLAGS are read once per process), against part 1's
  # datasheet peak (measured again only if part 1 wrote none).
  peak=$("$PY" -c 'import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(next((r["datasheet_bf16_gflops"] for r in rows if r.get("datasheet_bf16_gflops")), "measure"))' \
    "$rows" 2>/dev/null || echo measure)
  sweep() {
    local tag=$1 batch=$2 flags=$3
    XLA_FLAGS="${XLA_FLAGS:-} $flags" part 45 "$PY" benchmarks/train_step.py --device gpu \
      --sizes small --batch "$batch" --runs 5 --warmup 2 --dtypes bfloat16 --frameworks jax \
      --peak "$peak" --tag "$tag" --out "$rows"
  }
  sweep "command buffers off" 1024 "--xla_gpu_enable_command_buffer="
  sweep "latency-hiding scheduler" 1024 "--xla_gpu_enable_latency_hiding_scheduler=true"
  sweep "batch 2048" 2048 ""
  sweep "batch 4096" 4096 ""
  # 3. One traced step per size.
  part 80 "$PY" benchmarks/profile_summary.py --sizes small,medium,large --batch 1024 \
    --dtype bfloat16 --trace_dir "$OUT/profile" --out "$OUT/profile.jsonl" --md "$OUT/profile.md"
  # 4. The trainer end to end: grain workers with the recipe's RandAugment on the host, then on
  # the device, bf16.
  for where in host device; do
    part 90 "$PY" benchmarks/trainer_throughput.py --size small --batch 1024 --steps 20 \
      --rounds 2 --workers "$(( $(nproc) - 2 ))" --dtype bfloat16 --eval_examples 2048 \
      --randaugment_on "$where" --out "$OUT/trainer_throughput.jsonl"
  done
  # 5. RandAugment on the device: the host stream per worker, and the device's own rate.
  part 60 "$PY" benchmarks/input_pipeline.py --recipe tikd_cifar100 --batch 1024 --batches 10 \
    --runs 2 --workers 0,1 --randaugment_on device --out "$OUT/input_pipeline.jsonl"
  # 6. Does the GPU's compiler keep Pillow's roundings? (On CPU, CI asks the same.)
  part 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_device_randaugment.py \
    -k "pillow or exact or compose or autocontrast" 2>&1 | tee "$OUT/device_randaugment_tests.txt"
fi
{
  "$PY" benchmarks/report.py table "$rows"
  echo
  echo "Sweep (small bfloat16, each point against the defaults):"
  echo
  "$PY" benchmarks/report.py sweep "$rows"
} | tee "$OUT/device_check.md"
