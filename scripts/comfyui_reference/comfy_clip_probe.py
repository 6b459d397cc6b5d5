# ComfyUI side of localisation (a): text embeddings from clip.encode_from_tokens(clip.tokenize(text)),
# with ComfyUI's default CPU text-encoder dtype and with --fp32-text-enc; also reports model detection.
import os as _os
REF = _os.environ.get("COMFYREF", "/tmp/comfyref")
REPO = _os.environ.get("IMAGESMITH_REPO", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import sys, os, logging
sys.argv = [sys.argv[0], "--cpu", "--force-fp32", "--disable-all-custom-nodes"]
sys.path.insert(0, REF + "/ComfyUI"); os.chdir(REF + "/ComfyUI")
import comfy.options; comfy.options.enable_args_parsing()
logging.basicConfig(level=logging.INFO)
import torch; torch.set_num_threads(2)
import comfy.sd, comfy.model_management as mm
from comfy.cli_args import args
P = REF + "/models/checkpoints/rand-sd15.safetensors"
out = {}
for tag, fp32 in (("default", False), ("fp32_text_enc", True)):
    args.fp32_text_enc = fp32
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(P, output_vae=True, output_clip=True)
    if tag == "default":
        print("model class", type(model.model).__name__, "config", type(model.model.model_config).__name__,
              "unet dtype", model.model.get_dtype(), "vae dtype", vae.vae_dtype)
    te = clip.cond_stage_model
    print(tag, "text encoder param dtype", next(te.parameters()).dtype, "device", next(te.parameters()).device)
    with torch.inference_mode():
        for name, text in (("positive", "a (red:1.3) apple on a table"), ("negative", "text, watermark")):
            out[f"{tag}_{name}"] = clip.encode_from_tokens(clip.tokenize(text)).float().clone()
    del model, clip, vae
torch.save(out, REF + "/out/comfy_clip_probe.pt")
print({k: tuple(v.shape) for k, v in out.items()})
