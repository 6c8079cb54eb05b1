#!/usr/bin/env bash
# On a CUDA machine: the GPU tests and the benchmarks on the GPU, their output kept in one folder.
# survive_cuda.py trains consecutive steps at the probe's answer from a cold allocator on CUDA's own allocator.
#   benchmarks/gpu.sh [OUT] [all|predict]     (default OUT: benchmarks/results-gpu; default: all)
# predict (first, about 3 minutes on an H100 or H200): autobatch.predict on the CPU for this card against
# autobatch.probe on the card itself, for the same models, the error in %, with the CUDA context and the
# cuBLAS workspaces measured next to the card table's estimates (benchmarks/gpu_predict.py).
# The probe benchmark caps the CUDA allocator to each limit (set_per_process_memory_fraction) and
# reports, per case, the timeline model's predicted reserved peak next to the one measured, and the
# steps and out-of-memory errors of the new and the older search against an exhaustive one.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results-gpu}
what=${2:-all}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    | tee "$out/device.txt"
# A backstop: the check skips what its own 200 s budget leaves no time for; a failure here stops nothing else.
timeout 270 python benchmarks/gpu_predict.py --json "$out/predict.json" 2>&1 | tee "$out/predict.md" \
    || echo "predicted vs measured: failed or timed out (exit $?)" | tee -a "$out/predict.md"
if [ "$what" = predict ]; then
    exit 0
fi
pytest -m gpu -n 0 -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt"
python benchmarks/probe.py --device cuda 2>&1 | tee "$out/probe.md"
python benchmarks/loop.py --device cuda --rounds 5 2>&1 | tee "$out/loop.md"
python benchmarks/survive_cuda.py --steps 6 2>&1 | tee "$out/survive.md"
