# Build a random-weight, full-size SD1.5-architecture single-file checkpoint (LDM/A1111 layout).
# Run with {REPO}/.venv/bin/python (uses diffusers + imagesmith's converter, read-only).
import os as _os
REF = _os.environ.get("COMFYREF", "/tmp/comfyref")
REPO = _os.environ.get("IMAGESMITH_REPO", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import sys, torch
sys.path.insert(0, REPO + "/benchmarks")
from pathlib import Path
from engine_overhead import build_sd15          # full SD1.5 configs, torch.manual_seed(0)
from imagesmith.models.convert import pipeline_to_single_file
from safetensors.torch import save_file
torch.set_num_threads(2)
pipe = build_sd15()
sd = pipeline_to_single_file(pipe, "sd1")
sd = {k: v.float().contiguous() for k, v in sd.items()}
out = Path(REF + "/models/checkpoints/rand-sd15.safetensors")
save_file(sd, str(out))   # no imagesmith metadata: a plain real-world-style file
print(len(sd), "tensors", sum(v.numel() for v in sd.values())/1e6, "M params")
for p in ("model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model."):
    print(p, sum(1 for k in sd if k.startswith(p)))
print([k for k in sd if not k.startswith(("model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model."))][:10])
