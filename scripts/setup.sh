#!/bin/sh
# Make or reuse the project's environment (.venv by default): the torch build this machine needs,
# then the project with its [dev] extra at the versions CI last passed with (constraints.txt).
#
#   sh scripts/setup.sh [VENV]        (the Makefile's `make env`; `make repro` and `make test` call it)
#
# torch: a build already in the environment is kept (bring your own CUDA build). Otherwise torch
# $TORCH_VERSION: on Linux with an NVIDIA GPU, PyPI's CUDA build; on Linux without one, the CPU
# build from PyTorch's CPU index beside the usual one, so a laptop never downloads several GB of
# CUDA libraries (pip takes 2.13.0+cpu before 2.13.0: a local version sorts after its release);
# on macOS and Windows, PyPI's build, which has no CUDA.
set -eu
VENV=${1:-.venv}
TORCH=${TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: $PY: Python 3.10 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }

if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "setup: keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') in $VENV"
elif [ "$(uname -s)" = Linux ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: an NVIDIA GPU: torch $TORCH, CUDA build (PyPI)"
    pip install "torch==$TORCH"
elif [ "$(uname -s)" = Linux ]; then
    echo "setup: no NVIDIA GPU: torch $TORCH, CPU build (no CUDA libraries)"
    pip install "torch==$TORCH" --extra-index-url https://download.pytorch.org/whl/cpu --timeout 30 --retries 1
    if [ "$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')" ]; then
        echo "setup: warning: PyTorch's CPU index could not be reached, so pip took a CUDA build of torch" >&2
    fi
else
    echo "setup: torch $TORCH (PyPI's build for $(uname -s))"
    pip install "torch==$TORCH"
fi
echo "setup: the project and its [dev] extra (constraints.txt)"
pip install -c constraints.txt -e ".[dev]"
touch "$VENV/.installed"
