# Run ComfyUI 0.3.64's PromptExecutor (no server) on the API prompts; CPU, fp32.
# usage: venv/bin/python scripts/run_comfy.py euler dpmpp2m
import os as _os
REF = _os.environ.get("COMFYREF", "/tmp/comfyref")
REPO = _os.environ.get("IMAGESMITH_REPO", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import sys, os, json, asyncio
names = sys.argv[1:]
sys.argv = [sys.argv[0], "--cpu", "--force-fp32", "--disable-all-custom-nodes", "--output-directory", REF + "/out"] + os.environ.get("COMFY_EXTRA", "").split()
SUF = os.environ.get("SUFFIX", "")
sys.path.insert(0, REF + "/ComfyUI"); os.chdir(REF + "/ComfyUI")
import comfy.options; comfy.options.enable_args_parsing()
import torch; torch.set_num_threads(2)
import folder_paths
from comfy.cli_args import args
folder_paths.set_output_directory(REF + "/out")
folder_paths.add_model_folder_path("checkpoints", REF + "/models/checkpoints", is_default=True)
import execution, nodes, comfy.sample, comfy.model_management as mm
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
import glob, shutil
print("argv", sys.argv[1:], "device", mm.get_torch_device(), "unet dtype", mm.unet_dtype(), "attention:", 
      "pytorch" if mm.pytorch_attention_enabled() else "other")

CAP = {}
_prep = comfy.sample.prepare_noise
def prep(latent, seed, noise_inds=None):
    n = _prep(latent, seed, noise_inds); CAP["noise"] = n.clone(); return n
comfy.sample.prepare_noise = prep
_cks = nodes.common_ksampler
def cks(*a, **k):
    out = _cks(*a, **k); CAP["latent_out"] = out[0]["samples"].clone()
    CAP["positive"] = a[6][0][0].clone(); CAP["negative"] = a[7][0][0].clone()
    return out
nodes.common_ksampler = cks
_dec = nodes.VAEDecode.decode
def dec(self, vae, samples):
    out = _dec(self, vae, samples); CAP["image"] = out[0].clone(); return out
nodes.VAEDecode.decode = dec

class Srv:
    client_id = None; last_node_id = None
    def send_sync(self, *a, **k): pass
    def queue_updated(self): pass
ex = execution.PromptExecutor(Srv(), cache_type=False)
for name in names:
    prompt = json.load(open(f"{REF}/prompts/{name}.json"))
    valid = asyncio.run(execution.validate_prompt("p-" + name, prompt, None))
    assert valid[0], valid
    CAP.clear()
    ex.execute(prompt, "p-" + name, {}, valid[2])
    print(name, "success", ex.success, [m[0] for m in ex.status_messages])
    if not ex.success: print(ex.status_messages[-1]); sys.exit(1)
    torch.save(dict(CAP), f"{REF}/out/comfy_{name}{SUF}_intermediates.pt")
    png = sorted(glob.glob(f"{REF}/out/{name}_*.png"))[-1]; shutil.copy(png, f"{REF}/out/comfy_{name}{SUF}.png"); print("saved", png, "->", f"comfy_{name}{SUF}.png")
    for k, v in CAP.items(): print(" ", k, tuple(v.shape), float(v.float().mean()), float(v.float().std()))
