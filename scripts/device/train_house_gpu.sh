#!/usr/bin/env bash
# Train house-ldm (fresh UNet on the shipped VAE), house-clip and house-cutout side by side on ONE GPU machine
# that has no network, for wall-clock budgets, and pack the exported folders into $OUT (parts of <= 15 MB).
#
# What has to travel with the checkout (README: House models):
#   .whl/      wheels the GPU image lacks (diffusers, pydantic, pydantic-core, annotated-types,
#              typing-inspection, typing-extensions, importlib-metadata, emoji), downloaded for cp312
#   .dev/minilm  `python scripts/device/pack_minilm.py pack .dev/minilm` (MiniLM, caption vocabulary only)
#   .dev/home    $IMAGESMITH_HOME with cache/house/index.json and the object renders it names
# Budgets (seconds of training steps, after each trainer's data preparation): LDM_S, CLIP_S, CUT_S (the VAE
# stage's own budget is in the house-ldm config). MODELS picks the trainers (default "ldm clip cutout").
# EXTRA="ldm.key=value clip.key=value ..." overrides config keys (e.g. ldm.device=cpu for a dry run here).
set -u
MODELS=${MODELS:-ldm clip cutout}
LDM_S=${LDM_S:-300}; CLIP_S=${CLIP_S:-300}; CUT_S=${CUT_S:-360}
RUNS=${RUNS:-runs/gpu}
case " $MODELS " in *" ldm "*|*" clip "*) MINILM=1;; esac
. scripts/device/env.sh   # wheels, PYTHONPATH, IMAGESMITH_HOME, log(); with MINILM=1 the MiniLM in /tmp/minilm
mkdir -p "$RUNS/logs"
$PY -c "import torch, diffusers, transformers, imagesmith.train.house_ldm, imagesmith.train.house_clip, imagesmith.train.house_cutout; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" || exit 4
for m in $MODELS; do
  $PY - "$m" <<PYEOF || exit 6
import sys, yaml
m = sys.argv[1]
c = yaml.safe_load(open(f"src/imagesmith/train/configs/gpu/house-{m}.yaml"))
c["output_dir"] = "$RUNS/house-" + m
if m in ("ldm", "clip"):
    c["text_encoder_path"] = "/tmp/minilm"
if m != "vae":
    c["time_budget_s"] = float({"ldm": $LDM_S, "clip": $CLIP_S, "cutout": $CUT_S}[m])
for k, v in [kv.split("=", 1) for kv in "${EXTRA:-}".split() if kv.startswith(m + ".")]:
    c[k.split(".", 1)[1]] = yaml.safe_load(v)
yaml.safe_dump(c, open(f"$RUNS/house-{m}.yaml", "w"))
PYEOF
done
P1=0; P2=0; P3=0; P4=0
case " $MODELS " in *" vae "*)
  $PY -m imagesmith.train.house_ldm --config "$RUNS/house-vae.yaml" --stage vae > "$RUNS/logs/vae.log" 2>&1 &
  P4=$!;; esac
case " $MODELS " in *" ldm "*)
  $PY -m imagesmith.train.house_ldm --config "$RUNS/house-ldm.yaml" --export "$RUNS/export/house-ldm" > "$RUNS/logs/ldm.log" 2>&1 &
  P1=$!;; esac
case " $MODELS " in *" clip "*)
  $PY -m imagesmith.train.house_clip --config "$RUNS/house-clip.yaml" --export "$RUNS/export/house-clip" --json > "$RUNS/logs/clip.log" 2>&1 &
  P2=$!;; esac
case " $MODELS " in *" cutout "*)
  $PY -m imagesmith.train.house_cutout --config "$RUNS/house-cutout.yaml" --export "$RUNS/export/house-cutout" > "$RUNS/logs/cutout.log" 2>&1 &
  P3=$!;; esac
log "trainers started: $MODELS"
PIDS=$(for p in $P1 $P2 $P3 $P4; do [ "$p" != 0 ] && echo $p; done)
( sleep ${WATCHDOG:-470}; for p in $PIDS; do kill -INT $p 2>/dev/null; done; sleep 15; for p in $PIDS; do kill -9 $p 2>/dev/null; done ) &
WD=$!
alive() { for p in $PIDS; do kill -0 $p 2>/dev/null && return 0; done; return 1; }
while alive; do
  sleep 20
  log "vae $(tail -1 $RUNS/house-vae/vae/losses.jsonl 2>/dev/null | cut -c1-60) | ldm $(tail -c 300 $RUNS/house-ldm/unet/losses.jsonl 2>/dev/null | tail -1 | cut -c1-60) | clip $(tail -1 $RUNS/house-clip/losses.jsonl 2>/dev/null | cut -c1-40) | cutout $(tail -1 $RUNS/house-cutout/losses.jsonl 2>/dev/null | cut -c1-40)"
done
R1=-; R2=-; R3=-; R4=-
[ $P4 != 0 ] && { wait $P4; R4=$?; }
[ $P1 != 0 ] && { wait $P1; R1=$?; }; [ $P2 != 0 ] && { wait $P2; R2=$?; }; [ $P3 != 0 ] && { wait $P3; R3=$?; }
pkill -P $WD 2>/dev/null; kill $WD 2>/dev/null  # and its sleep, which would hold the output open
log "exit codes ldm $R1 clip $R2 cutout $R3 vae $R4"
for f in $MODELS; do echo "== $f"; grep -v "^\s*$" "$RUNS/logs/$f.log" | grep -iv "warn" | tail -n 8; done
for m in clip cutout; do cp "$RUNS/house-$m/metrics.json" "$RUNS/export/$m-metrics.json" 2>/dev/null; done
if [ ! -d "$RUNS/export/house-ldm" ] && [ -f "$RUNS/house-ldm/unet/checkpoint/ema.safetensors" ]; then
  log "no house-ldm export: packing the UNet checkpoint's EMA weights (fp16) instead"
  $PY -c "import sys; from safetensors.torch import load_file, save_file; save_file({k: v.half() for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" "$RUNS/house-ldm/unet/checkpoint/ema.safetensors" "$RUNS/export/ldm-ema-fp16.safetensors"
  cp "$RUNS/house-ldm/unet/checkpoint/state.json" "$RUNS/export/ldm-state.json"
fi
mkdir -p "$RUNS/export"; for m in $MODELS; do cp "$RUNS/house-$m.yaml" "$RUNS/export/"; done
cp "$RUNS"/house-ldm/unet/losses.jsonl "$RUNS/export/ldm-losses.jsonl" 2>/dev/null
cp "$RUNS"/house-clip/losses.jsonl "$RUNS/export/clip-losses.jsonl" 2>/dev/null
cp "$RUNS"/house-cutout/losses.jsonl "$RUNS/export/cutout-losses.jsonl" 2>/dev/null
cp "$RUNS"/house-cutout/preview.png "$RUNS/export/cutout-preview.png" 2>/dev/null
if [ -f "$RUNS/house-vae/vae/checkpoint/model.safetensors" ]; then
  mkdir -p "$RUNS/export/house-vae"
  cp "$RUNS/house-vae/vae/checkpoint/model.safetensors" "$RUNS/house-vae/vae/checkpoint/state.json" "$RUNS/house-vae/vae/losses.jsonl" "$RUNS/export/house-vae/"
fi
cp -r "$RUNS/logs" "$RUNS/export/"
tar -C "$RUNS" -cf - export | split -b 15000000 -d - "$OUT/house-gpu.tar."
ls -la "$OUT"
log "done"
