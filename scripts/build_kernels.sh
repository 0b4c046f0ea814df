#!/usr/bin/env bash
# Compile mamba-ssm's and causal-conv1d's CUDA kernels for ONE GPU architecture and install them into
# the active Python environment (run on a machine with nvcc and the torch you train with).
#
#   bash scripts/build_kernels.sh 8.0     # A100; 7.0 for V100, 9.0 for H100/H200
#
# Why: their setup.py files compile a fixed list of architectures (sm_75 up to sm_121 with a recent
# CUDA) whatever TORCH_CUDA_ARCH_LIST says, which takes 10-30 minutes, and they leave out sm_70, so
# V100s get no kernels at all. This script downloads their sources (or takes them from SDIST_DIR),
# replaces that list with the one architecture, and builds with MAMBA_FORCE_BUILD /
# CAUSAL_CONV1D_FORCE_BUILD (no prebuilt wheel). Run scripts/install.sh first; it installs everything
# else (--cpu there skips its own kernel build).
#
# Environment: MAMBA_SSM_VERSION (default 2.3.2.post1), CAUSAL_CONV1D_VERSION (1.7.0), SDIST_DIR (a
# folder holding mamba_ssm-V.tar.gz and causal_conv1d-V.tar.gz, for machines without network access),
# WORK_DIR (default: a new temporary folder), MAX_JOBS (parallel compile jobs, default 8).
set -euo pipefail

ARCH=${1:-}
MAMBA_SSM_VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION:-1.7.0}
SDIST_DIR=${SDIST_DIR:-}
WORK_DIR=${WORK_DIR:-$(mktemp -d)}
MAX_JOBS=${MAX_JOBS:-8}

if [[ ! "${ARCH}" =~ ^[0-9]+\.[0-9]$ ]]; then
  echo "build_kernels.sh: give the GPU architecture as MAJOR.MINOR, e.g. 7.0 (V100), 8.0 (A100)," \
    "9.0 (H100/H200); got '${ARCH}'" >&2
  exit 2
fi
sm=${ARCH/./}
packages=("mamba_ssm-${MAMBA_SSM_VERSION}" "causal_conv1d-${CAUSAL_CONV1D_VERSION}")

mkdir -p "${WORK_DIR}"
cd "${WORK_DIR}"
if [ -n "${SDIST_DIR}" ]; then
  for package in "${packages[@]}"; do
    cp "${SDIST_DIR}/${package}.tar.gz" .
  done
else
  python -m pip download --no-deps --no-binary :all: --no-build-isolation -d . \
    "mamba-ssm==${MAMBA_SSM_VERSION}" "causal-conv1d==${CAUSAL_CONV1D_VERSION}"
fi

for package in "${packages[@]}"; do
  tar xzf "${package}.tar.gz"
  # Every hard-coded "-gencode arch=compute_XX,code=sm_XX" pair goes; cc_flag starts with the one wanted.
  python - "${package}/setup.py" "${sm}" <<'PY'
import re, sys

path, sm = sys.argv[1], sys.argv[2]
text = open(path).read()
pair = re.compile(r'cc_flag\.append\("-gencode"\)\n(\s*)cc_flag\.append\("arch=compute_\d+,code=sm_\d+"\)')
text, removed = pair.subn(r"pass\n\1pass", text)
start = "cc_flag = []"
if removed == 0 or text.count(start) != 1:
    sys.exit(f"{path}: unexpected layout (found {removed} -gencode pairs); cannot restrict the architectures")
text = text.replace(start, f'cc_flag = ["-gencode", "arch=compute_{sm},code=sm_{sm}"]')
open(path, "w").write(text)
print(f"{path}: {removed} architecture(s) replaced by sm_{sm}")
PY
done

export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="${ARCH}" MAX_JOBS
python -m pip install --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall \
  "./${packages[1]}" "./${packages[0]}"
python -c "import torch, selective_scan_cuda, causal_conv1d_cuda; print('kernels built for sm_${sm}, torch', torch.__version__)"
