"""ComfyScript (PyPI comfy-script 0.6.1, its `client` extra) as its README uses it: load the server's nodes from
/object_info, build the default graph as Python calls, queue it, wait on the WebSocket, fetch the images. Run in
its own process by tests/serve/test_comfy_api.py (ComfyScript keeps its client and queue watcher in globals)."""

import sys

from comfy_script.runtime import Workflow, load

load(sys.argv[1])
from comfy_script.runtime.nodes import (CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage,  # noqa: E402
                                        KSampler, SaveImage, VAEDecode)

with Workflow(wait=True):
    model, clip, vae = CheckpointLoaderSimple("tiny-sd15")
    pos = CLIPTextEncode("a glass bottle on a table", clip)
    neg = CLIPTextEncode("text, watermark", clip)
    latent = EmptyLatentImage(64, 48, 2)
    latent = KSampler(model, 7, 2, 8, "euler", "normal", pos, neg, latent, 1)
    image = VAEDecode(latent, vae)
    saved = SaveImage(image, "script")
print("IMAGES", [im.size for im in saved.wait()])
