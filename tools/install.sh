#!/usr/bin/env bash
# Set up a fresh machine for inrank-megatron: system packages, a venv at .venv, pinned Python deps.
# Idempotent. Usage: bash tools/install.sh   (as root, or with sudo for apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mpicc >/dev/null 2>&1; then          # mpi4py builds against OpenMPI
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q libopenmpi-dev openmpi-bin >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import torch, megatron.core, deepspeed, inrank_megatron" 2>/dev/null
echo "install ok: $(.venv/bin/python -c 'import torch, megatron.core as m, deepspeed as d; print("torch", torch.__version__, "megatron-core", m.__version__, "deepspeed", d.__version__)' 2>/dev/null)"
