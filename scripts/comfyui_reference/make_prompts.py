import os as _os
REF = _os.environ.get("COMFYREF", "/tmp/comfyref")
REPO = _os.environ.get("IMAGESMITH_REPO", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import json
def wf(name, seed, sampler, scheduler):
    return {
      "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 4, "cfg": 7.0, "sampler_name": sampler,
            "scheduler": scheduler, "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
      "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "rand-sd15.safetensors"}},
      "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
      "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.3) apple on a table", "clip": ["4", 1]}},
      "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
      "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
      "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": name, "images": ["8", 0]}},
    }
for name, seed, s, sch in (("euler", 42, "euler", "normal"), ("dpmpp2m", 7, "dpmpp_2m", "karras")):
    json.dump(wf(name, seed, s, sch), open(f"{REF}/prompts/{name}.json", "w"), indent=1)
