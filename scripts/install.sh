#!/usr/bin/env bash
# Install kotomamba and everything it needs into the active Python environment.
#
#   bash scripts/install.sh           # GPU machine: mamba-ssm/causal-conv1d with their CUDA kernels
#   bash scripts/install.sh --cpu     # CPU-only machine: mamba-ssm's pure-PyTorch reference path
#   bash scripts/install.sh --cpu --dev   # also the test-only requirements
#
# Environment: TORCH_SPEC (default torch==2.13.0), MAMBA_SSM_VERSION, CAUSAL_CONV1D_VERSION.
set -euo pipefail

cpu_only=0
dev=0
for arg in "$@"; do
  case "$arg" in
    --cpu) cpu_only=1 ;;
    --dev) dev=1 ;;
    *) echo "install.sh: unknown option '$arg' (expected --cpu and/or --dev)" >&2; exit 2 ;;
  esac
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
torch_spec=${TORCH_SPEC:-torch==2.13.0}
mamba_version=${MAMBA_SSM_VERSION:-2.3.2.post1}
conv_version=${CAUSAL_CONV1D_VERSION:-1.7.0}
pip=(python -m pip install --disable-pip-version-check)

"${pip[@]}" "$torch_spec" setuptools wheel
"${pip[@]}" -r "$repo_root/requirements.txt"
if [ "$dev" = 1 ]; then
  "${pip[@]}" -r "$repo_root/requirements-dev.txt"
fi

# mamba-ssm and causal-conv1d compile against the torch already installed, hence no build isolation.
if [ "$cpu_only" = 1 ]; then
  export MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
  export CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
fi
"${pip[@]}" --no-build-isolation "mamba-ssm==$mamba_version" "causal-conv1d==$conv_version"

# kotomamba itself, editable; this compiles megatron_lm's C++ sample-index helper (pybind11).
"${pip[@]}" --no-build-isolation -e "$repo_root"
python -c "import megatron_lm.helpers, kotomamba; print('kotomamba', kotomamba.__version__, 'installed')"
