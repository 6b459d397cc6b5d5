# Run the same API prompts through imagesmith's graph executor. usage: {REPO}/.venv/bin/python run_imagesmith.py euler dpmpp2m
import os as _os
REF = _os.environ.get("COMFYREF", "/tmp/comfyref")
REPO = _os.environ.get("IMAGESMITH_REPO", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import os, sys, json, shutil
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
import torch; torch.set_num_threads(2)
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.engine.graph.nodes import executor_for
from imagesmith.engine.graph.executor import GraphContext
import imagesmith.engine.graph.nodes as N
import imagesmith.engine.sampling.ksampler as K

CAP = {}
_noise = K.initial_noise
def noise(*a, **k):
    n = _noise(*a, **k); CAP["noise"] = n.clone(); return n
K.initial_noise = noise
_ks = N.ksample
def ks(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **k):
    out = _ks(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **k)
    CAP["latent_out"] = out["samples"].clone(); CAP["positive"] = positive[0].embeds.clone()
    CAP["negative"] = negative[0].embeds.clone(); return out
N.ksample = ks

settings = Settings(home=Path(REF + "/ishome")); settings.ensure_home()
engine = Engine(settings, device="cpu")
_dec = engine.vae_decode_tensor
def dec(*a, **k):
    out = _dec(*a, **k); CAP["image"] = out.permute(0, 2, 3, 1).clone(); return out
engine.vae_decode_tensor = dec
ex = executor_for(engine)
outdir = Path(REF + "/ishome/out"); outdir.mkdir(parents=True, exist_ok=True)
for name in sys.argv[1:]:
    prompt = json.load(open(f"{REF}/prompts/{name}.json"))
    CAP.clear()
    checked = ex.validate(prompt)
    ctx = GraphContext(engine=engine, output_dir=outdir, temp_dir=outdir / "temp", input_dir=outdir / "in", prompt=prompt)
    result = ex.run(prompt, ctx, checked.outputs)
    print(name, result)
    pngs = sorted(outdir.rglob(f"{name}_*.png"), key=lambda p: p.stat().st_mtime)
    shutil.copy(pngs[-1], f"{REF}/out/imagesmith_{name}.png")
    torch.save(dict(CAP), f"{REF}/out/imagesmith_{name}_intermediates.pt")
    for k, v in CAP.items(): print(" ", k, tuple(v.shape), float(v.float().mean()), float(v.float().std()))
print("dtype", engine.dtype)
