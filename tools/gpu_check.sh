#!/usr/bin/env bash
# The GPU checks of the kernels issue, as one short run on a machine with a GPU (the device tool's
# image: python3 with a CUDA torch and Triton; deepspeed and megatron-core are not needed here).
#   bash tools/gpu_check.sh            # results under $OUT (the device tool's) or /tmp/gpu_check
# 1. the Triton kernels against dense matmuls on the GPU (fp32, fp16, bf16);
# 2. the MLP training step at d_model 4096, sparse against dense in one process (target: ≥ 4× at D = 0.1);
# 3. a checkpoint save under an NCCL process group (its collectives take CUDA tensors only).
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
