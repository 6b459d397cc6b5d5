#!/usr/bin/env bash
# Issue #5's CUDA run of `imagesmith train lora` on a lent GPU machine (no network): see check_lora_cuda.py.
# Carry (run tool): .whl/ (as for train_house_gpu.sh, plus PyYAML/peft if the GPU image lacks them),
# .dev/minilm (`python scripts/device/pack_minilm.py pack .dev/minilm`) and .dev/home (may be empty: the
# LoRA's data is drawn by the shipped house-ldm on the device). Writes $OUT/lora_check.json; exit 0 = all checks met.
#   run: bash scripts/device/check_lora_cuda.sh        (about 2 minutes on an H200; timeout_s 420)
set -u
CHECK=${CHECK:-0} MINILM=1 . scripts/device/env.sh   # CHECK 0: .dev/home need not hold the dataset
mkdir -p "$IMAGESMITH_HOME"
$PY -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'peft', peft.__version__)" || exit 4
$PY scripts/device/check_lora_cuda.py --device ${DEVICE:-cuda} --steps ${STEPS:-120} --kill-at ${KILL_AT:-60}
rc=$?
log "check_lora_cuda exit $rc"
exit $rc
