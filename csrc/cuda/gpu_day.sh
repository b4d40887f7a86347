#!/usr/bin/env bash
# The day a GPU is lent: one command that builds everything (nvcc; the ptxas summary fails
# the build on spills), runs the `gpu` tests (real per-step and persistent kernels against
# the reference, modules against torch.nn/cuDNN, the auto choice on this device), the
# first-use check's grid (python -m fusedrnn.verify: each backend's worst error against the
# reference on this GPU), then the GPU benchmark preset (fusedrnn vs torch.nn = cuDNN).
#
#     bash csrc/cuda/gpu_day.sh            # from anywhere in the repo
#
# Extra arguments go to pytest. FUSEDRNN_CUDA_ALGO=per_step|persistent|auto (default auto)
# selects the CUDA kernels for the whole run, e.g. to benchmark the part-1 kernels.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv || true
python3 dev.py test -m gpu -q -rs "$@"
.venv/bin/python -m fusedrnn.verify --device cuda
python3 dev.py bench --preset gpu
