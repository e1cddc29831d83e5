#!/usr/bin/env bash
# The GPU check, start to finish on the GPU machine's bare image in one call (docs/guide/gpu-check.md):
#   bash tools/prepare_gpu_wheels.sh      # here, once: what the image lacks -> build/gpu_wheels
#   bash tools/gpu_check.sh               # there (the device tool, carry build/gpu_wheels): results in $OUT
#   bash tools/gpu_check.sh --rehearse    # here, on the CPU (CI runs it): a fresh venv holding only
#                                         # what the image holds, the wheels installed with --no-index
# Steps (tools/gpu_check.py): install the wheels; the kernels against a float64 oracle in fp32, fp16
# and bf16; the MLP step at d_model 4096, sparse against dense; data; the 1.1B plan; 20 steps of the
# 1.1B preset in bf16 with recomputation, memory beside the plan; its NCCL checkpoint resumed; the
# NCCL checkpoint test. No `set -e`: every step runs whatever happened before it, each under a
# timeout, and $OUT/summary.json (default /tmp/gpu_check) is rewritten after each one.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
if [ "${1:-}" != "--rehearse" ]; then
    exec python3 tools/gpu_check.py --out "$out" "$@"
fi
shift
# The image's python is 3.12; the rehearsal takes this machine's, with the same versions of the
# wheels tied to a python from build/gpu_wheels_host (gpu_wheels.py checks the 3.12 ones themselves).
venv="${REHEARSE_VENV:-build/gpu_rehearsal}"
rm -rf "$venv" "$out" "${out}_work"
python3 -m venv "$venv" || exit 1
# What the image holds that the steps use (every name is in tools/gpu_image.txt, at its version there
# where one is recorded — numpy 2.5.2 has no build for this python; the tests check both): a newer
# huggingface-hub, say, needs packages the image lacks. torch pinned: CPU torch, never an unpinned one
# (it may pull a multi-GB CUDA build).
image=(numpy pyyaml tqdm sentencepiece==0.2.2 safetensors==0.8.0 transformers==5.17.0 pyarrow pandas filelock
       fsspec huggingface-hub==1.33.0 xxhash packaging einops msgpack ninja psutil py-cpuinfo typing-extensions
       pytest requests)
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install torch==2.13.0 "${image[@]}" || exit 1
# pip pulls a few packages the image lacks as their dependencies: without them, as there.
beyond=$("$venv/bin/python" tools/gpu_wheels.py --beyond-image) || exit 1
[ -z "$beyond" ] || "${pip[@]}" uninstall -y $beyond || exit 1
exec "$venv/bin/python" tools/gpu_check.py --rehearse --out "$out" --find-links build/gpu_wheels_host "$@"
