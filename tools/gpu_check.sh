#!/usr/bin/env bash
# The GPU checks of the kernels issue, as one short run on a machine with a GPU (the device tool's
# image: python3 with a CUDA torch and Triton; deepspeed and megatron-core are not needed here).
#   bash tools/gpu_check.sh            # results under $OUT (the device tool's) or /tmp/gpu_check
# 1. the Triton kernels against dense matmuls on the GPU (fp32, fp16, bf16);
# 2. the MLP training step at d_model 4096, sparse against dense in one process (target: ≥ 4× at D = 0.1);
# 3. a checkpoint save under an NCCL process group (its collectives take CUDA tensors only);
# 4. the 1.1B preset on one GPU for 20 steps in bf16 with activation checkpointing, its peak device
#    memory (torch.cuda.max_memory_allocated, in the run's summary) beside `sparse-lm plan`'s figure.
#    Steps 4 needs deepspeed, megatron-core, sentencepiece and datasets there: carry them as wheels
#    (the device tool's README) if the image lacks them; the summary at the end says what ran.
# Budget: about 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
# --noconftest: conftest.py's data fixtures need `datasets`, which these tests do not use.
python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py -k triton 2>&1 | tee "$out/triton_tests.log"
python3 tools/bench_step.py --device cuda --dtype bfloat16 --d-models 4096 --modes block32 block64 \
    --densities 1 0.1 0.05 --tokens 8192 --repeat 5 --json "$out/step_gpu.json" --markdown "$out/step_gpu.md"
python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_checkpoint.py -k gpu 2>&1 | tee "$out/checkpoint_gpu.log"
if python3 -c "import deepspeed, megatron.core, sentencepiece, datasets" 2>/dev/null; then
    python3 -m sparse_lm prepare-data --corpus stdlib --out /tmp/gpu_data --max-bytes 8000000 --vocab-size 8192
    preset=(--config configs/llama-1b-tp4.yaml --set parallel.tensor=1 --set data.path=/tmp/gpu_data
            --set train.steps=20 --set train.seq_len=1024 --set train.micro_batch=4 --set train.grad_accum=1
            --set train.warmup_steps=2 --set train.log_every=5 --set train.eval_every=20 --set train.eval_batches=2
            --set train.precision=bf16 --set train.activation_checkpointing=true
            --set train.out_dir=/tmp/gpu_1b --set checkpoint.every=20 --set checkpoint.resume=never)
    python3 -m sparse_lm plan "${preset[@]}" --gpu-memory-gib 80 --json "$out/plan_1b.json" | tee "$out/plan_1b.txt"
    python3 -m sparse_lm pretrain "${preset[@]}" --summary-json "$out/run_1b.json" 2>&1 | tee "$out/run_1b.log"
else
    echo "1.1B run skipped: deepspeed / megatron-core / sentencepiece / datasets not importable" | tee "$out/run_1b.log"
fi
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = []
for name in ("step_gpu.json",):
    if (out / name).is_file():
        lines.append(f"{name}: written")
plan, run = out / "plan_1b.json", out / "run_1b.json"
if plan.is_file() and run.is_file():
    p, r = json.loads(plan.read_text()), json.loads(run.read_text())
    peak = r.get("peak_device_bytes")
    lines.append(f"1.1B bf16 + recompute: plan {p['per_rank']['total_bytes'] / 2**30:.2f} GiB, "
                 f"measured peak {peak / 2**30 if peak else float('nan'):.2f} GiB, "
                 f"{r['tokens_seen'] / r['wall_s']:.0f} tok/s (whole run)")
print("\n".join(lines) or "nothing measured")
PY
