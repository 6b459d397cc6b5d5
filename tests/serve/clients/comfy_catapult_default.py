"""comfy-catapult (PyPI comfy-catapult 3.0.0) as its README uses it, against `imagesmith serve`.

Run by tests/serve/test_comfy_api.py with the Python of its own virtual environment (.venv/clients/catapult, made
by `make install`): the client pins attrs<24, websockets<13 and rich<14, which imagesmith's environment outgrew, so
it runs as its users run it, in an environment of its own.

It reads /system_stats, /object_info and /queue into its pydantic models (a schema it does not accept fails here),
uploads a photo through its comfy+http:// file API, schedules the default graph and an img2img graph with
`Catapult(..., use_future_api=True)` (it watches /ws, polls /queue and reads /history until the future resolves),
downloads the outputs with `DownloadPreviewImage`, cancels a pending job, and prints one JSON line of what it saw.

    python comfy_catapult_default.py URL CHECKPOINT WORKDIR
"""

import asyncio
import copy
import json
import sys
from pathlib import Path

from anyio import Path as AsyncPath  # the client's file API takes anyio paths
from comfy_catapult.api_client import ComfyAPIClient
from comfy_catapult.catapult import ComfyCatapult
from comfy_catapult.comfy_schema import APIHistoryEntry
from comfy_catapult.comfy_utils import DownloadPreviewImage
from comfy_catapult.remote_file_api_comfy import ComfySchemeRemoteFileAPI

URL, CHECKPOINT, WORK = sys.argv[1].rstrip("/"), sys.argv[2], Path(sys.argv[3])

DEFAULT = {
    "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"},
          "inputs": {"seed": 3, "steps": 2, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                     "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
          "inputs": {"ckpt_name": CHECKPOINT}},
    "5": {"class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent Image"},
          "inputs": {"width": 64, "height": 56, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
          "inputs": {"text": "a glass bottle on a table", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"}, "inputs": {"text": "text", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "_meta": {"title": "VAE Decode"}, "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
          "inputs": {"filename_prefix": "catapult", "images": ["8", 0]}},
}


def png_size(path: Path) -> list:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return [int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")]


async def run_one(catapult, remote, job_id: str, workflow: dict, out: Path) -> dict:
    status, future = await catapult.Catapult(job_id=job_id, prepared_workflow=workflow, important=["9"],
                                              use_future_api=True)
    history = APIHistoryEntry.model_validate(await asyncio.wait_for(future, 120))
    await DownloadPreviewImage(node_id="9", job_history=history, field_path="images[0]", comfy_api_url=URL,
                               remote=remote, local_dst_path=AsyncPath(out))
    status, _ = await catapult.GetStatus(job_id=job_id)
    return {"size": png_size(out), "prompt_id": status.ticket.prompt_id, "success": status.success is not None,
            "errors": [str(e) for e in status.errors]}


async def main() -> None:
    seen = {}
    async with ComfyAPIClient(comfy_api_url=URL) as client:
        stats = await client.GetSystemStats()
        seen["devices"] = len(stats.devices)
        info = await client.GetObjectInfo()
        seen["nodes"] = len(info.root)
        seen["queue"] = (await client.GetQueue()).model_dump(exclude_none=True)
        remote = ComfySchemeRemoteFileAPI(comfy_api_urls=[URL], overwrite=True)
        photo = WORK / "photo.png"
        dest = "comfy+" + URL + "/input/catapult/photo.png"
        seen["uploaded"] = await remote.UploadFile(src_path=AsyncPath(photo), untrusted_dst_url=dest)
        async with ComfyCatapult(comfy_client=client, debug_path=AsyncPath(WORK / "debug")) as catapult:
            seen["default"] = await run_one(catapult, remote, "default-1", copy.deepcopy(DEFAULT), WORK / "a.png")
            img2img = copy.deepcopy(DEFAULT)
            img2img["10"] = {"class_type": "LoadImage", "_meta": {"title": "Load"},
                             "inputs": {"image": "catapult/photo.png"}}
            img2img["11"] = {"class_type": "VAEEncode", "_meta": {"title": "Encode"},
                             "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
            img2img["3"]["inputs"].update(latent_image=["11", 0], denoise=0.6)
            seen["img2img"] = await run_one(catapult, remote, "img2img-1", img2img, WORK / "b.png")
            # cancel: the server is paused by the test for this one, so the job waits in /queue as pending
            (WORK / "paused").write_text("")
            while (WORK / "paused").exists():
                await asyncio.sleep(0.05)
            status, future = await catapult.Catapult(job_id="cancel-1", prepared_workflow=copy.deepcopy(DEFAULT),
                                                      important=["9"], use_future_api=True)
            await catapult.CancelJob(job_id="cancel-1")
            status, _ = await catapult.GetStatus(job_id="cancel-1")
            seen["canceled"] = {"prompt_id": status.ticket.prompt_id, "cancelled": status.cancelled is not None,
                                "future_cancelled": future.cancelled()}
            seen["queue_after"] = (await client.GetQueue()).model_dump(exclude_none=True)
        await client.PostInterrupt()
        await client.PostFree(unload_models=False, free_memory=True)
        history = await client.GetHistory(prompt_id=seen["default"]["prompt_id"])
        seen["history_ids"] = sorted(history.root)
    print("CATAPULT " + json.dumps(seen, sort_keys=True))


asyncio.run(main())
