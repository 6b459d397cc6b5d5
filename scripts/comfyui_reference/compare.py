import os as _os
REF = _os.environ.get("COMFYREF", "/tmp/comfyref")
REPO = _os.environ.get("IMAGESMITH_REPO", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import numpy as np, torch, sys
SUF = sys.argv[1] if len(sys.argv) > 1 else ""
from PIL import Image
SF = 0.18215
for name in ("euler", "dpmpp2m"):
    a = np.asarray(Image.open(f"{REF}/out/comfy_{name}{SUF}.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(f"{REF}/out/imagesmith_{name}.png").convert("RGB")).astype(int)
    d = np.abs(a - b)
    print(f"{name}: shape {a.shape} comfy mean/std {a.mean():.2f}/{a.std():.2f}  imagesmith mean/std {b.mean():.2f}/{b.std():.2f}")
    print(f"  PNG: max abs {d.max()}  mean abs {d.mean():.5f}  frac>1 {np.mean(d > 1):.6f}  frac>4 {np.mean(d > 4):.6f}  frac!=0 {np.mean(d > 0):.6f}")
    c = torch.load(f"{REF}/out/comfy_{name}{SUF}_intermediates.pt"); i = torch.load(f"{REF}/out/imagesmith_{name}_intermediates.pt")
    for k in ("positive", "negative", "noise", "image"):
        x, y = c[k].float(), i[k].float()
        print(f"  {k:10s} max abs diff {float((x - y).abs().max()):.3e}  (max |x| {float(x.abs().max()):.3g})")
    x, y = c["latent_out"].float() * SF, i["latent_out"].float()
    print(f"  latent_out (comfy x {SF}) max abs diff {float((x - y).abs().max()):.3e}  rel {float((x-y).abs().max()/y.abs().max()):.3e}")
    print(f"  latent_out raw ratio comfy/imagesmith: {float((c['latent_out'].float()/i['latent_out'].float()).median()):.5f}")
