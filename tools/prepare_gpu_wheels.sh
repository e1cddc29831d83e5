#!/usr/bin/env bash
# Wheels for what the GPU machine's image lacks (python 3.12; it has torch, triton, transformers,
# sentencepiece, pyarrow, pandas, pytest, ... — tools/gpu_image.txt — but no deepspeed, megatron-core
# or datasets, and nothing can be downloaded there), prepared here, where pip reaches PyPI:
#   bash tools/prepare_gpu_wheels.sh        # -> build/gpu_wheels (cp312, carried), build/gpu_wheels_host
# build/ is git-ignored, so the device tool copies build/gpu_wheels only when a run names it in
# `carry`; tools/gpu_check.sh installs them there with `pip install --no-index --find-links`.
# build/gpu_wheels_host holds, for each wheel tied to a python version, the same version for this
# machine's python: `gpu_check.sh --rehearse` installs those here (it is never carried).
# The pins are the versions the test suite runs with; every Requires-Dist of these wheels that the
# image lacks is among them (`python3 tools/gpu_wheels.py build/gpu_wheels` checks, as the check's
# install step does). typing-extensions and fsspec are in the image, at versions not all recorded:
# they come for pydantic's >= 4.16 and datasets' <= 2026.9.0, and pip takes them only where the
# image's own do not satisfy those. tzdata is not in the image, and python-dateutil 4 (pandas', so
# datasets') requires it: the rehearsal found it missing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/gpu_wheels host=build/gpu_wheels_host
BUILT=(deepspeed==0.19.8)  # a source release only: built here as a pure py3-none-any wheel
BINARY=(megatron-core==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 fsspec==2026.9.0 tzdata==2026.6)
rm -rf "$out" "$host"
mkdir -p "$out" "$host"
python3 -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: -w "$out" "${BUILT[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$out" "${BINARY[@]}"
for wheel in "$out"/*.whl; do  # name-version-[build-]python-abi-platform.whl
    case "$wheel" in *-py3-none-any.whl|*-py2.py3-none-any.whl) continue ;; esac
    spec=$(basename "$wheel" | awk -F- '{print $1 "==" $2}')
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$host" "$spec"
done
ls -l "$out" "$host"
du -ch "$out"/*.whl | tail -1
python3 tools/gpu_wheels.py "$out"
