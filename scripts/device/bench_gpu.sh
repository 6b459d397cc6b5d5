#!/usr/bin/env bash
# Issue #29's device run: imagesmith's performance modes (quality, fast, turbo) against plain diffusers on full-size
# random-weight SDXL and FLUX-dev, one H200-class GPU, no network (benchmarks/gpu_modes.py says what it measures).
# Carry (run tool): .whl/ with the wheels the GPU image lacks (diffusers, pydantic + pydantic-core, annotated-types,
# typing-inspection, typing-extensions, importlib-metadata, torchsde, trampoline, torchao 0.17 for torch 2.11).
# The house weights are not needed: keep them out of the transfer (the tree must stay under 64 MiB; see
# docs/performance.md, "Running the GPU benchmark").
#   run: bash scripts/device/bench_gpu.sh        (about 7 minutes on an H200; timeout_s 560)
# Writes $OUT/gpu_modes.json (rewritten after every section), $OUT/gpu_modes.log and one PNG per mode (8 files).
set -u
. scripts/device/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, diffusers, torchao; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'torchao', torchao.__version__)" || exit 4
mkdir -p "$OUT/img"
$PY benchmarks/gpu_modes.py --out "$OUT/gpu_modes.json" --budget-s "${BUDGET_S:-430}" --images "$OUT/img" \
  ${ARCHS:+--archs $ARCHS} ${MODES:+--modes $MODES} ${BENCH_ARGS:-} 2>&1 | grep --line-buffered -v "Loading\|it/s\]$" | tee "$OUT/gpu_modes.log"
rc=${PIPESTATUS[0]}
log "gpu_modes exit $rc"
exit $rc
