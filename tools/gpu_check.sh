#!/usr/bin/env bash
# One-GPU check of megatron-keye (about 3-4 minutes on one GPU): the tiny and small flavors in
# bf16 on an NCCL world of one with SDPA (and flash-attn / TransformerEngine where they import),
# 20 steps whose loss must fall, the first loss equal to the CPU fp32 run's within bf16
# tolerance, save -> load -> identical next loss, and tokens/s and MFU against the GPU's
# published BF16 peak. The checks live in megatron_keye/bench/gpu_check.py.
#
# Usage, from anywhere:
#   tools/gpu_check.sh                          # an environment that already has the package
#                                               # and its dependencies (e.g. this checkout's .venv)
#   WHEELS=/path/to/wheels tools/gpu_check.sh   # a fresh single-GPU box without network:
#       Python >= 3.11 (3.12 is fine) with a CUDA build of torch already installed. The script
#       installs megatron-core==0.16.1 (a wheel for that Python, e.g.
#       megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl) and whichever of
#       numpy packaging pyyaml psutil tokenizers safetensors are missing, with
#       `pip install --no-index --find-links $WHEELS` (torch is never touched), then this package
#       with --no-deps. Fill such a folder on a machine with network with, e.g.:
#         pip download --only-binary=:all: --python-version 3.12 --no-deps -d wheels \
#             megatron-core==0.16.1 pyyaml psutil tokenizers safetensors setuptools wheel
#   Any extra arguments go to the check, e.g. `tools/gpu_check.sh --flavors tiny --backends sdpa`
#   (see `python -m megatron_keye.bench.gpu_check --help`).
#
# Environment: PYTHON (default: the checkout's .venv/bin/python if present, else python3),
# WHEELS (see above).
# Exit codes: 0 passed, 1 a check failed, 2 set-up failed, 77 no CUDA device (nothing was run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# The checked-out code wins over any installed copy.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

has_module() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

if ! has_module torch; then
    echo "gpu_check: $PYTHON has no torch; install a CUDA build of torch first" >&2
    exit 2
fi

if [[ -n "${WHEELS:-}" ]]; then
    if [[ ! -d "$WHEELS" ]]; then
        echo "gpu_check: WHEELS=$WHEELS is not a directory" >&2
        exit 2
    fi
    pip_local=("$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS")
    if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('megatron-core') != '0.16.1')" 2>/dev/null; then
        echo "gpu_check: installing megatron-core==0.16.1 from $WHEELS"
        "${pip_local[@]}" --no-deps "megatron-core==0.16.1" || { echo "gpu_check: no usable megatron-core 0.16.1 wheel in $WHEELS" >&2; exit 2; }
    fi
    # import name:distribution name
    for pair in numpy:numpy packaging:packaging yaml:pyyaml psutil:psutil tokenizers:tokenizers safetensors:safetensors; do
        module="${pair%%:*}"; dist="${pair#*:}"
        if ! has_module "$module"; then
            echo "gpu_check: installing $dist from $WHEELS"
            "${pip_local[@]}" "$dist" || { echo "gpu_check: $dist is missing and not in $WHEELS" >&2; exit 2; }
        fi
    done
    if "$PYTHON" -c "import importlib.metadata as m; m.version('megatron-keye')" >/dev/null 2>&1; then
        echo "gpu_check: megatron-keye is already installed (the checkout is used via PYTHONPATH)"
    elif echo "gpu_check: installing megatron-keye (--no-deps)" \
            && ! "${pip_local[@]}" --no-deps "$ROOT" >/dev/null 2>&1; then
        # Building needs setuptools; without it in the env or in $WHEELS the checkout is used
        # through PYTHONPATH alone, which is all the check needs.
        echo "gpu_check: could not build the package (setuptools missing?); using the checkout via PYTHONPATH"
    fi
fi

for module in megatron.core yaml numpy psutil tokenizers; do
    if ! has_module "$module"; then
        echo "gpu_check: $PYTHON cannot import $module; run with WHEELS=/path/to/wheels (see the header)" >&2
        exit 2
    fi
done

status=0
"$PYTHON" -m megatron_keye.bench.gpu_check "$@" || status=$?
exit "$status"
