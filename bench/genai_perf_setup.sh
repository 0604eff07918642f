#!/usr/bin/env bash
# GenAI-Perf and the perf_analyzer it runs, for bench/genai_perf_vs_load.py, in DIR (default
# /work/.genai-perf; outside the repository, never part of `make test`). Measured here
# (Debian 12, glibc 2.36, no GPU): a few minutes, ~950 MB.
#
# Why these versions and files:
# - `pip install perf-analyzer` is a 2.3 kB placeholder (no binary), and tritonclient[all]
#   2.73 depends on it; tritonclient 2.52-2.60 ship a perf_analyzer that needs glibc 2.38
#   (`version 'GLIBC_2.38' not found`). tritonclient[all]==2.51.0 ships one that runs here.
# - That binary links libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel; no GPU is
#   used) and libb64.so.0d (Debian's libb64-0d, unpacked here, not installed system-wide).
# - perf_analyzer 2.51 with --warmup-request-count > 0 on a decoupled model never ends its
#   warm-up here; bench/genai_perf_vs_load.py passes 0 and sends its own warm-up.
set -euo pipefail
DIR=${1:-/work/.genai-perf}
mkdir -p "$DIR"
python3 -m venv "$DIR/perf-analyzer"
"$DIR/perf-analyzer/bin/pip" install -q --no-compile 'tritonclient[all]==2.51.0' nvidia-cuda-runtime-cu12
mkdir -p "$DIR/extlib" && (cd "$DIR/extlib" && apt-get download libb64-0d >/dev/null \
    && dpkg-deb -x libb64-0d_*.deb deb && cp deb/usr/lib/x86_64-linux-gnu/libb64.so.0d . && rm -rf deb libb64-0d_*.deb)
python3 -m venv "$DIR/genai-perf"
"$DIR/genai-perf/bin/pip" install -q --no-compile genai-perf==0.0.16
CUDART=$(ls -d "$DIR"/perf-analyzer/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
cat > "$DIR/env.sh" <<ENV
# source this before running perf_analyzer or genai-perf
export LD_LIBRARY_PATH=$DIR/extlib:$CUDART\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export PATH=$DIR/perf-analyzer/bin:$DIR/genai-perf/bin:\$PATH HF_HUB_OFFLINE=1
ENV
. "$DIR/env.sh" && perf_analyzer --version && genai-perf --version
