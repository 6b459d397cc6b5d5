"""The most used A1111 client, `webuiapi` (0.9.17 from PyPI), against a live `imagesmith serve`: the calls it
makes with its own defaults (sampler 'Euler a', schedule 'Automatic'), and the listings it reads at connect
time. First slice of the real-client suite (issue 'The A1111 API that real clients use')."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def api(tiny_home, tmp_path_factory):
    from fixtures.live import live_server
    with live_server(tiny_home, tmp_path_factory.mktemp("webuiapi")) as (url, _, home):
        host, port = url.rsplit(":", 1)
        client = webuiapi.WebUIApi(host=host.removeprefix("http://"), port=int(port), sampler="Euler a", steps=3)
        # options name the real default checkpoint from the start (was: null), and the client can switch it
        assert client.util_get_current_model() == "house-ldm"
        client.util_set_model("tiny-sd15")
        client.imagesmith_home = home  # for the tests that look at what the server kept on disk
        yield client


def test_txt2img_with_the_clients_defaults(api):
    """The client sends scheduler 'Automatic' and sampler 'Euler a' (both were refused before)."""
    r = api.txt2img(prompt="a red apple", seed=11, width=64, height=64, batch_size=2, n_iter=1, cfg_scale=5)
    assert len(r.images) == 2 and all(im.size == (64, 64) for im in r.images)
    assert r.info["all_seeds"] == [11, 12] and r.info["seed"] == 11 and r.info["all_subseeds"] == [-1, -1]
    assert (r.info["width"], r.info["height"], r.info["steps"], r.info["cfg_scale"]) == (64, 64, 3, 5)
    assert r.info["all_prompts"] == ["a red apple"] * 2 and r.info["index_of_first_image"] == 0
    assert "Sampler: Euler a, Schedule type: Normal" in r.info["infotexts"][0]  # Automatic = Euler a's own
    assert "Model: tiny-sd15" in r.info["infotexts"][0]
    # a prompt edit A1111 cannot parse is read as text, as A1111 does (the native API names it as an error)
    odd = api.txt2img(prompt="a [red:green:x] apple", seed=11, width=64, height=64)
    assert odd.image.size == (64, 64) and odd.info["infotexts"][0].startswith("a [red:green:x] apple")
    again = api.txt2img(prompt="a red apple", seed=11, width=64, height=64, cfg_scale=5)
    # image 0 of the batch alone: the same noise; batched kernels may round one level apart
    assert np.abs(np.asarray(again.image, np.int16) - np.asarray(r.images[0], np.int16)).max() <= 2


@pytest.mark.parametrize("sampler,scheduler", [("DPM++ 2M", "Karras"), ("Euler a", "Karras"),
                                               ("DPM++ SDE", "Automatic"), ("DPM++ 2M Karras", "Automatic"),
                                               ("UniPC", "SGM Uniform"), ("LMS", "Align Your Steps")])
def test_any_sampler_with_any_schedule_type(api, sampler, scheduler):
    r = api.txt2img(prompt="a pear", seed=3, width=64, height=64, sampler_name=sampler, scheduler=scheduler)
    assert r.image.size == (64, 64)


def test_img2img_and_inpainting(api):
    init = Image.fromarray((np.indices((64, 64)).sum(0) % 255).astype(np.uint8)).convert("RGB")
    r = api.img2img(images=[init], prompt="a pear", seed=5, width=64, height=64, denoising_strength=0.5)
    assert r.image.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = api.img2img(images=[init], mask_image=mask, prompt="a pear", seed=5, width=64, height=64,
                    denoising_strength=0.8, mask_blur=0)
    out = np.asarray(r.image.convert("RGB"), np.int16)
    assert np.array_equal(out[:8, :8], np.asarray(init, np.int16)[:8, :8])  # outside the mask: the input
    # the client's defaults are A1111's (masked content 'fill', inpaint area 'only masked'); each choice runs
    looks = {}
    for fill in range(4):
        looks[fill] = np.asarray(api.img2img(images=[init], mask_image=mask, prompt="a pear", seed=5, width=64,
                                             height=64, denoising_strength=0.5, mask_blur=0, inpainting_fill=fill,
                                             inpaint_full_res=fill % 2).image.convert("RGB"), np.int16)
        assert np.array_equal(looks[fill][:16], np.asarray(init, np.int16)[:16])
    assert len({v[16:48, 16:48].tobytes() for v in looks.values()}) == 4
    inverted = api.img2img(images=[init], mask_image=mask, prompt="a pear", seed=5, width=64, height=64,
                           denoising_strength=0.5, mask_blur=0, inpainting_mask_invert=1)
    kept = np.asarray(inverted.image.convert("RGB"), np.int16)
    assert np.array_equal(kept[16:48, 16:48], np.asarray(init, np.int16)[16:48, 16:48])  # the square is kept now
    with pytest.raises(RuntimeError) as err:
        api.img2img(images=[init], mask_image=mask, prompt="a pear", width=64, height=64, inpainting_fill=7)
    assert "422" in str(err.value) and "inpainting_fill" in str(err.value)


def test_png_info_reads_the_infotext_back(api):
    r = api.txt2img(prompt="a lemon", seed=21, width=64, height=64)
    info = api.png_info(r.image)
    assert "Seed: 21" in info.info and "a lemon" in info.info


def test_the_listings_the_client_reads(api):
    assert "Euler a" in api.util_get_sampler_names() and "DPM++ 2M SDE" in api.util_get_sampler_names()
    schedulers = api.get_schedulers()
    assert [s["label"] for s in schedulers][:2] == ["Automatic", "Normal"]
    assert {"Karras", "SGM Uniform", "Align Your Steps", "KL Optimal", "Beta", "Polyexponential"} <= \
        {s["label"] for s in schedulers}
    assert api.util_get_current_model() == "tiny-sd15"
    assert "tiny-sd15" in api.util_get_model_names()
    # the client returns whatever JSON comes back, a 404's {"detail": "Not Found"} included: check the shapes
    assert isinstance(api.get_cmd_flags()["api"], bool)
    assert set(api.get_embeddings()) == {"loaded", "skipped"}
    assert api.get_hypernetworks() == [] and api.get_prompt_styles() == []
    assert isinstance(api.get_face_restorers(), list) and isinstance(api.get_sd_vae(), list)
    assert {m["name"] for m in api.get_realesrgan_models()} == {"R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"}
    assert api.get_memory()["ram"]["total"] > 0
    assert {u["name"] for u in api.get_upscalers()} >= {"None", "Lanczos", "R-ESRGAN 4x+"}
    assert api.refresh_checkpoints() is None  # A1111 answers null


def test_override_settings_that_decide_the_picture(api):
    plain = api.txt2img(prompt="a plum", seed=9, width=64, height=64, sampler_name="Euler a")
    ensd = api.txt2img(prompt="a plum", seed=9, width=64, height=64, sampler_name="Euler a",
                       override_settings={"eta_noise_seed_delta": 31337})
    assert "ENSD: 31337" in ensd.info["infotexts"][0]
    assert np.abs(np.asarray(plain.image, np.int16) - np.asarray(ensd.image, np.int16)).mean() > 0.5
    skip = api.txt2img(prompt="a plum", seed=9, width=64, height=64, override_settings={"CLIP_stop_at_last_layers": 2})
    assert "Clip skip: 2" in skip.info["infotexts"][0]
    with pytest.raises(RuntimeError, match="NV is not emulated"):
        api.txt2img(prompt="a plum", seed=9, width=64, height=64, override_settings={"randn_source": "NV"})


def test_samples_format_as_a1111_encodes_its_answer(api):
    """A1111 answers in opts.samples_format: JPEG/WebP carry the infotext in EXIF UserComment (what its PNG Info
    and parsers read). Per request (override_settings) and per user (options), and an unknown format is a 422."""
    import base64
    import io
    import requests
    url = api.baseurl
    body = {"prompt": "a fig", "seed": 5, "width": 64, "height": 64, "steps": 2,
            "override_settings": {"samples_format": "jpg"}}
    r = requests.post(f"{url}/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert im.format == "JPEG" and im.size == (64, 64)
    comment = im.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0") and "Seed: 5" in comment[8:].decode("utf-16-be")
    api.set_options({"samples_format": "webp"})
    try:
        r = requests.post(f"{url}/txt2img", json={**body, "override_settings": {}}, timeout=120)
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).format == "WEBP"
    finally:
        api.set_options({"samples_format": "png"})
    assert api.txt2img(prompt="a fig", seed=5, width=64, height=64, steps=2,
                       alwayson_scripts={}).image.format in (None, "PNG")
    bad = requests.post(f"{url}/txt2img", json={**body, "override_settings": {"samples_format": "bmp"}}, timeout=60)
    assert bad.status_code == 422 and "samples_format" in bad.json()["detail"]


def _edges_image() -> Image.Image:
    im = Image.new("RGB", (64, 64), "black")
    im.paste((255, 255, 255), (16, 16, 48, 48))
    return im


def test_the_controlnet_extension_api(api):
    """The sd-webui-controlnet routes and units as webuiapi sends them (alwayson_scripts.ControlNet.args)."""
    assert api.controlnet_version() == 2
    assert api.controlnet_model_list() == ["tiny-controlnet"]
    assert api.controlnet_module_list() == ["none", "canny", "scribble_xdog",
                                             "lineart_standard (from white bg & black line)",
                                             "invert (from white bg & black line)", "threshold", "tile_resample",
                                             "openpose", "openpose_hand", "openpose_face", "openpose_faceonly",
                                             "openpose_full", "depth_anything", "depth_anything_v2",
                                             "depth_midas", "depth_zoe", "lineart_realistic", "lineart_coarse",
                                             "lineart_anime", "softedge_hed", "softedge_hedsafe", "scribble_hed",
                                             "inpaint_only", "inpaint_global_harmonious"]
    detected = api.controlnet_detect([_edges_image()], module="canny", threshold_a=100, threshold_b=200)
    edges = np.asarray(detected.images[0].convert("L"))
    assert edges.max() == 255 and edges[32, 32] == 0 and edges[16, 16:48].max() == 255  # the square's outline
    unit = webuiapi.ControlNetUnit(image=_edges_image(), module="canny", model="tiny-controlnet [a1b2c3d4]",
                                   weight=0.8, threshold_a=100, threshold_b=200)
    plain = api.txt2img(prompt="a box", seed=4, width=64, height=64)
    guided = api.txt2img(prompt="a box", seed=4, width=64, height=64, controlnet_units=[unit])
    assert 'ControlNet: "tiny-controlnet (canny, 0.8)"' in guided.info["infotexts"][0]  # A1111 quotes values with commas
    assert np.abs(np.asarray(plain.image, np.int16) - np.asarray(guided.image, np.int16)).mean() > 0.5
    # the extension appends its detected map after the pictures (unless told not to)
    assert len(guided.images) == 2 and len(guided.info["infotexts"]) == 1
    assert np.array_equal(np.asarray(guided.images[1].convert("L")), edges)
    bare = api.txt2img(prompt="a box", seed=4, width=64, height=64, controlnet_units=[unit], alwayson_scripts={},
                       override_settings={"control_net_no_detectmap": True})
    assert len(bare.images) == 1 and np.array_equal(np.asarray(bare.image), np.asarray(guided.image))
    # with hires fix (it used to fail: the second pass got the first pass's map) and the unit's control mode
    hires = api.txt2img(prompt="a box", seed=4, width=64, height=64, controlnet_units=[webuiapi.ControlNetUnit(
        image=_edges_image(), module="canny", model="tiny-controlnet", threshold_a=100, threshold_b=200,
        control_mode=1)], alwayson_scripts={}, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
        denoising_strength=0.5)
    assert hires.image.size == (96, 96) and "My prompt is more important" in hires.info["infotexts"][0]
    init = _edges_image()
    r = api.img2img(images=[init], prompt="a box", seed=4, width=64, height=64, denoising_strength=0.6,
                    controlnet_units=[unit])
    assert 'ControlNet: "tiny-controlnet' in r.info["infotexts"][0]


def test_several_controlnet_units_add_up(api):
    """Multi-unit ControlNet as the extension does it: each enabled unit's residuals are summed. Two identical units
    at weight 0.4 are one unit at 0.8 (the residuals scale linearly); a second unit at weight 0 changes nothing; the
    infotext names every unit."""
    def unit(weight, module="canny"):
        return webuiapi.ControlNetUnit(image=_edges_image(), module=module, model="tiny-controlnet", weight=weight,
                                       threshold_a=100, threshold_b=200)
    kw = dict(prompt="a box", seed=4, width=64, height=64)
    one = api.txt2img(**kw, controlnet_units=[unit(0.8)], alwayson_scripts={})
    two = api.txt2img(**kw, controlnet_units=[unit(0.4), unit(0.4)], alwayson_scripts={})
    assert np.abs(np.asarray(one.image, np.int16) - np.asarray(two.image, np.int16)).max() <= 2
    assert 'ControlNet: "tiny-controlnet (canny, 0.4); tiny-controlnet (canny, 0.4)"' in two.info["infotexts"][0]
    idle = api.txt2img(**kw, controlnet_units=[unit(0.8), unit(0.0, "none")], alwayson_scripts={})
    assert np.array_equal(np.asarray(idle.image), np.asarray(one.image))
    mixed = api.txt2img(**kw, controlnet_units=[unit(0.8), unit(0.8, "none")], alwayson_scripts={})
    assert np.abs(np.asarray(mixed.image, np.int16) - np.asarray(one.image, np.int16)).mean() > 0.5


@pytest.mark.parametrize("units,needle", [
    ([dict(module="mlsd")], "not available in imagesmith; available: none, canny, scribble_xdog"),
    ([dict(module="lineart_anime")], "lineart_anime needs netG.pth or netG.safetensors"),  # no file there
    ([dict(module="depth_midas")], "depth_midas needs a DPT folder"),  # no depth model installed there
    ([{}] * 5, "at most 4 ControlNet units a request; 5 are enabled"),
])
def test_controlnet_units_imagesmith_cannot_run_are_a_422(api, units, needle):
    made = [webuiapi.ControlNetUnit(image=_edges_image(), model="tiny-controlnet", **u) for u in units]
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a box", seed=4, width=64, height=64, controlnet_units=made)
    assert err.value.args[0] == 422 and needle in err.value.args[1]


def test_lineart_units_on_the_users_annotator_file(api):
    """The user's sk_model.pth (lllyasviel/Annotators, here with random weights) under models/annotators/: the
    extension's detect route and a lineart unit (by the extension's old name 'lineart' too) run it at the unit's
    processor_res; the map equals the engine's own preprocessing of the same photo."""
    import skimage.data as data
    import torch
    from imagesmith.core.requests import ControlNetSpec
    from imagesmith.core.settings import Settings
    from imagesmith.engine.annotators import LineartNet
    from imagesmith.engine.controlnet import preprocess
    folder = api.imagesmith_home / "models" / "annotators" / "lineart"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(LineartNet().state_dict(), folder / "sk_model.pth")
    photo = Image.fromarray(data.astronaut()).resize((96, 96))
    try:
        detected = api.controlnet_detect([photo], module="lineart_realistic", processor_res=128).images[0]
        want = preprocess(photo, ControlNetSpec(model="-", image="-", preprocessor="lineart_realistic",
                                                processor_res=128), settings=Settings(home=api.imagesmith_home))
        assert detected.size == (96, 96) and np.array_equal(np.asarray(detected.convert("RGB")), np.asarray(want))
        assert np.asarray(want).std() > 5
        kw = dict(alwayson_scripts={}, prompt="a portrait", seed=4, width=64, height=64)
        plain = np.asarray(api.txt2img(**kw).image, np.int16)
        unit = webuiapi.ControlNetUnit(image=photo, module="lineart", model="tiny-controlnet", processor_res=128)
        guided = api.txt2img(**kw, controlnet_units=[unit])
        assert 'tiny-controlnet (lineart_realistic, 1)' in guided.info["infotexts"][0]
        assert np.abs(np.asarray(guided.image, np.int16) - plain).mean() > 0.5
    finally:
        (folder / "sk_model.pth").unlink()


# webuiapi's txt2img has `alwayson_scripts={}` as a mutable default and writes its ControlNet and ADetailer units
# into it, so every later call of the same process resends them (a client bug real users meet): the tests below pass
# a fresh dict.


def test_prompt_styles_as_a1111_applies_them(api):
    """styles.csv under the home, managed through prompt-styles, applied as A1111 does: '{prompt}' takes the prompt
    in its place, other text is appended after a comma; the negative prompt the same way."""
    import httpx
    styles = [{"name": "studio", "prompt": "studio photo of {prompt}, soft light", "negative_prompt": "blurry"},
              {"name": "film", "prompt": "35mm film grain", "negative_prompt": ""}]
    for s in styles:
        assert httpx.post(f"{api.baseurl}/prompt-styles", json=s).status_code == 200
    assert [s["name"] for s in api.get_prompt_styles()] == ["studio", "film"]
    r = api.txt2img(alwayson_scripts={}, prompt="a red apple", negative_prompt="text", styles=["studio", "film"], seed=4, width=64,
                    height=64)
    assert r.info["all_prompts"] == ["studio photo of a red apple, soft light, 35mm film grain"]
    assert r.info["all_negative_prompts"] == ["text, blurry"] and r.info["prompt"] == "a red apple"
    assert r.info["infotexts"][0].startswith("studio photo of a red apple, soft light, 35mm film grain\n")
    with pytest.raises(RuntimeError) as err:  # webuiapi raises on a non-200, with the body
        api.txt2img(alwayson_scripts={}, prompt="x", styles=["noir"], width=64, height=64)
    assert "422" in str(err.value) and "noir" in str(err.value) and "studio, film" in str(err.value)
    for s in styles:
        assert httpx.delete(f"{api.baseurl}/prompt-styles/{s['name']}").status_code == 200
    assert api.get_prompt_styles() == []


def test_adetailer_args_drive_the_face_detailer(api):
    """webuiapi's ADetailer units (alwayson_scripts) run imagesmith's face detailer; the client found 'adetailer'
    in /scripts at connect time, so it sends [False] when no unit is given (no detailer then)."""
    assert api.has_adetailer
    unit = webuiapi.ADetailer(ad_model="face_yolov8n.pt", ad_prompt="smiling", ad_denoising_strength=0.3)
    r = api.txt2img(alwayson_scripts={}, prompt="a portrait", seed=6, width=64, height=64, adetailer=[unit])
    info = r.info["infotexts"][0]
    # a YOLO face model runs as mediapipe's two face models, and the infotext says so
    assert "ADetailer model: mediapipe_face," in info and "ADetailer denoising strength: 0.3" in info
    assert "ADetailer inpaint padding: 32" in info  # ADetailer's padding is pixels (its default 32)
    assert "ADetailer" not in api.txt2img(alwayson_scripts={}, prompt="a portrait", seed=6, width=64, height=64).info["infotexts"][0]
    # two tabs: faces, then hands, each with its own settings (ADetailer's " 2nd" keys)
    units = [webuiapi.ADetailer(ad_model="mediapipe_face_short", ad_confidence=0.5, ad_dilate_erode=-4),
             webuiapi.ADetailer(ad_model="hand_yolov8n.pt", ad_prompt="detailed hands", ad_denoising_strength=0.2)]
    info = api.txt2img(alwayson_scripts={}, prompt="a hand", seed=6, width=64, height=64,
                       adetailer=units).info["infotexts"][0]
    assert "ADetailer model: mediapipe_face_short" in info and "ADetailer confidence: 0.5" in info
    assert "ADetailer dilate erode: -4" in info  # a negative value erodes, as ADetailer's
    assert "ADetailer model 2nd: mediapipe_hands" in info and "ADetailer prompt 2nd: detailed hands" in info
    assert "ADetailer denoising strength 2nd: 0.2" in info
    with pytest.raises(RuntimeError) as err:
        api.txt2img(alwayson_scripts={}, prompt="a cat", width=64, height=64,
                    adetailer=[webuiapi.ADetailer(ad_model="cat_yolov8n.pt")])
    assert "422" in str(err.value) and "cat_yolov8n.pt" in str(err.value) and "hand_yolov8n.pt" in str(err.value)


def test_send_images_extras_batch_skip_and_the_error_shape(api):
    import httpx
    r = api.txt2img(alwayson_scripts={}, prompt="a plum", seed=2, width=64, height=64, send_images=False)
    assert r.images == [] and r.info["all_seeds"] == [2]  # the info still comes back
    tiles = [Image.new("RGB", (16, 12), c) for c in ((200, 10, 10), (10, 200, 10))]
    out = api.extra_batch_images(tiles, upscaler_1="Lanczos", upscaling_resize=2)
    assert [im.size for im in out.images] == [(32, 24), (32, 24)]
    assert [np.asarray(im.convert("RGB"))[12, 16].tolist() for im in out.images] == [[200, 10, 10], [10, 200, 10]]
    assert api.skip() == {"interrupted": 0}
    wide = api.txt2img(alwayson_scripts={}, prompt="a plum", seed=2, width=96, height=64, seed_resize_from_w=64,
                       seed_resize_from_h=64)
    assert wide.image.size == (96, 64) and (wide.info["seed_resize_from_w"], wide.info["seed_resize_from_h"]) == (64, 64)
    assert "Seed resize from: 64x64" in wide.info["infotexts"][0]
    assert api.get_latent_upscale_modes() == [{"name": "Latent"}]
    bad = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "sampler_name": "Nope", "width": 64, "height": 64})
    body = bad.json()
    assert bad.status_code == 422 and set(body) >= {"error", "detail", "body", "errors"}  # A1111's error shape
    assert "Nope" in body["detail"] and "Euler a" in body["detail"]
    native = httpx.get(api.baseurl.replace("/sdapi/v1", "/v1/jobs/nope"))
    assert native.status_code == 404 and set(native.json()["error"]) == {"code", "message"}  # native shape kept


def test_unload_and_reload_checkpoint_routes(api):
    """A1111's unload-checkpoint / reload-checkpoint (webuiapi has no method for them; clients post them bare): the
    worker drops its models, the next generation loads what it needs, reload warms the default up again."""
    import requests
    url = api.baseurl
    r = requests.post(f"{url}/unload-checkpoint", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "unloaded", r.text
    out = api.txt2img(prompt="a pear", seed=3, width=64, height=64, steps=2, alwayson_scripts={})  # its default leaks
    assert out.image.size == (64, 64)
    r = requests.post(f"{url}/reload-checkpoint", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "loaded"


def test_save_images_false_keeps_nothing(api):
    """A1111's API saves nothing unless the call says ``save_images: true`` (webuiapi sends false by default), and
    its Extras never save: once answered, such a call leaves no output file, no database copy and none of the
    uploads made from its base64 images. The job's row stays, saying so. With ``save_images: true`` the images
    stay downloadable, byte for byte what the client got."""
    import io

    import httpx
    home = api.imagesmith_home

    def files() -> set[str]:
        return {str(p.relative_to(home)) for d in ("outputs", "uploads") if (home / d).is_dir()
                for p in (home / d).rglob("*") if p.is_file()}
    before = files()
    init = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    api.txt2img(alwayson_scripts={}, prompt="a plum", seed=4, width=64, height=64)
    r = api.img2img(images=[init], mask_image=mask, prompt="a plum", seed=4, width=64, height=64, mask_blur=0,
                    denoising_strength=0.5, alwayson_scripts={})
    api.extra_single_image(init, upscaler_1="Lanczos", upscaling_resize=2)
    assert files() == before  # nothing of the three calls is left
    job = httpx.get(api.baseurl.replace("/sdapi/v1", f"/v1/jobs/{r.info['job_id']}")).json()
    assert job["status"] == "succeeded" and job["files"] == []  # the row stays, its files do not
    kept = api.txt2img(alwayson_scripts={}, prompt="a plum", seed=4, width=64, height=64, save_images=True)
    job = httpx.get(api.baseurl.replace("/sdapi/v1", f"/v1/jobs/{kept.info['job_id']}")).json()
    assert len(job["files"]) == 1 and len(files() - before) == 1
    saved = httpx.get(api.baseurl.replace("/sdapi/v1", "") + job["files"][0]["url"])
    assert saved.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(saved.content))), np.asarray(kept.image))


def test_override_settings_kept_when_not_restored(api):
    """override_settings_restore_afterwards=False: A1111 keeps the request's overrides as the settings."""
    before = api.get_options()["CLIP_stop_at_last_layers"] if "CLIP_stop_at_last_layers" in api.get_options() else 1
    api.txt2img(alwayson_scripts={}, prompt="a plum", seed=4, width=64, height=64,
                override_settings={"CLIP_stop_at_last_layers": 2})  # restored afterwards (the default)
    assert api.get_options().get("CLIP_stop_at_last_layers", 1) == before
    r = api.txt2img(alwayson_scripts={}, prompt="a plum", seed=4, width=64, height=64,
                    override_settings={"CLIP_stop_at_last_layers": 2}, override_settings_restore_afterwards=False)
    assert "Clip skip: 2" in r.info["infotexts"][0]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": before})


def test_the_model_free_preprocessors_as_the_extension_runs_them(api):
    """detect with each model-free module: a drawing's black strokes become white lines (invert, lineart), a photo
    gives scribble lines (xdog), threshold binarises at its level, tile_resample makes the image coarser."""
    drawing = Image.new("RGB", (64, 64), "white")
    drawing.paste((0, 0, 0), (30, 8, 34, 56))  # one black stroke
    inverted = np.asarray(api.controlnet_detect([drawing], module="invert (from white bg & black line)")
                          .images[0].convert("L"))
    assert inverted[32, 32] == 255 and inverted[32, 8] == 0
    lines = np.asarray(api.controlnet_detect([drawing], module="lineart_standard (from white bg & black line)")
                       .images[0].convert("L"))
    assert lines[32, 32] > 100 and lines[32, 8] == 0
    photo = Image.fromarray((np.indices((64, 64)).sum(0) * 3 % 255).astype(np.uint8)).convert("RGB")
    photo.paste((20, 20, 20), (16, 16, 48, 48))
    xdog = np.asarray(api.controlnet_detect([photo], module="scribble_xdog", threshold_a=32).images[0].convert("L"))
    assert set(np.unique(xdog)) <= {0, 255} and 0 < (xdog == 255).mean() < 0.5
    gray = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).convert("RGB")
    binary = np.asarray(api.controlnet_detect([gray], module="threshold", threshold_a=100).images[0].convert("L"))
    assert binary[0, 24] == 0 and binary[0, 26] == 255  # 4 x 25 = 100 is not above the level
    tile = api.controlnet_detect([photo], module="tile_resample", threshold_a=2.0).images[0]
    assert tile.size == (32, 32)


def test_a_negative_embedding_dropped_in_while_the_server_runs(api, tiny_models):
    """Textual inversion as A1111 users use it: a file in models/embeddings, its name in the negative prompt; the
    listing shows it, the infotext carries its hash, and the picture changes."""
    import shutil
    folder = api.imagesmith_home / "models" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_models.paths["tiny-embedding"], folder / "easynegative.safetensors")
    listed = api.get_embeddings()
    assert listed["loaded"]["easynegative"]["vectors"] == 2 and listed["loaded"]["easynegative"]["shape"] == 32
    with_ti = api.txt2img(alwayson_scripts={}, prompt="a red apple", negative_prompt="EasyNegative", seed=5,
                          width=64, height=64)
    assert 'TI hashes: "easynegative: ' in with_ti.info["infotexts"][0]
    (folder / "easynegative.safetensors").unlink()
    without = api.txt2img(alwayson_scripts={}, prompt="a red apple", negative_prompt="EasyNegative", seed=5,
                          width=64, height=64)
    assert "TI hashes" not in without.info["infotexts"][0]
    assert not np.array_equal(np.asarray(with_ti.image), np.asarray(without.image))


def test_openpose_from_a_real_photo_as_the_extension_detects_it(api):
    """module openpose: mediapipe's pose landmarks of scikit-image's astronaut drawn as OpenPose's skeleton
    (black background; the neck-to-shoulder limbs in OpenPose's red and orange, joints as dots)."""
    import skimage.data as data
    photo = Image.fromarray(data.astronaut())
    pose = np.asarray(api.controlnet_detect([photo], module="openpose").images[0].convert("RGB")).astype(int)
    assert pose.shape == (512, 512, 3)
    lit = pose.max(-1) > 40
    assert 0.002 < lit.mean() < 0.1  # a thin skeleton on black
    ys, xs = np.nonzero(lit)
    assert 120 < xs.mean() < 380 and ys.min() < 200  # the body of the astronaut, head included
    red = (pose[..., 0] > 120) & (pose[..., 1] < 60) & (pose[..., 2] < 60)
    assert red.sum() > 50  # OpenPose's neck-to-right-shoulder limb
    blank = api.controlnet_detect([Image.new("RGB", (64, 64), (90, 90, 90))], module="openpose").images[0]
    assert np.asarray(blank).max() == 0  # nobody there: an empty map
    # openpose_full: body, hands and face; the keypoints come back as OpenPose JSON in `poses`, as the extension's
    full = api.controlnet_detect([photo], module="openpose_full")
    (poses,) = full.json["poses"]
    (person,) = poses["people"]
    assert poses["canvas_width"] == 512 and len(person["pose_keypoints_2d"]) == 18 * 3
    assert len(person["face_keypoints_2d"]) == 70 * 3 and person["pose_keypoints_2d"][2] == 1.0
    assert (np.asarray(full.images[0].convert("RGB")) == 255).all(-1).sum() > 70  # the face's white dots
    assert "poses" not in api.controlnet_detect([photo], module="canny").json


def test_ip_adapter_units_as_the_controlnet_extension_sends_them(api):
    """An IP-Adapter through the extension's unit (module ip-adapter_clip_sd15, model 'name [hash]'): the reference
    changes the picture, weight 0 leaves it; a FaceID unit (module ip-adapter_face_id) reads the face of a real
    photo through the InsightFace model in models/insightface; a FaceID Plus unit naming a missing adapter is a 422
    naming it."""
    import skimage.data as data

    from fixtures.tiny import build_arcface_onnx, build_clip_vision, build_faceid_adapter, build_ip_adapter, build_sd15
    models = api.imagesmith_home / "models"
    build_clip_vision(models / "clip_vision" / "tiny-vision")
    build_ip_adapter(build_sd15(0).unet, models / "ipadapter" / "tiny-ip.safetensors")
    build_faceid_adapter(build_sd15(0).unet, models / "ipadapter" / "tiny-faceid_sd15.bin")
    build_arcface_onnx(models / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx")
    ref = Image.fromarray((np.indices((48, 48)).sum(0) * 5 % 255).astype(np.uint8)).convert("RGB")
    args = dict(alwayson_scripts={}, prompt="a red apple", seed=8, width=64, height=64, steps=4)
    plain = np.asarray(api.txt2img(**args).image, np.int16)

    def unit(weight):
        return webuiapi.ControlNetUnit(image=ref, module="ip-adapter_clip_sd15", model="tiny-ip [0123abcd]",
                                       weight=weight)
    guided = api.txt2img(**{**args, "alwayson_scripts": {}}, controlnet_units=[unit(1.0)])
    assert np.abs(np.asarray(guided.image, np.int16) - plain).max() > 8
    assert "IP-Adapter: " in guided.info["infotexts"][0]
    window = webuiapi.ControlNetUnit(image=ref, module="ip-adapter_clip_sd15", model="tiny-ip [0123abcd]",
                                     guidance_start=0.25, guidance_end=0.75)  # the unit's steps reach the engine
    late = api.txt2img(**{**args, "alwayson_scripts": {}}, controlnet_units=[window])
    assert 'tiny-ip (1, 0.25-0.75)' in late.info["infotexts"][0]
    assert not np.array_equal(np.asarray(late.image, np.int16), np.asarray(guided.image, np.int16))
    zero = api.txt2img(**{**args, "alwayson_scripts": {}}, controlnet_units=[unit(0.0)])
    assert np.abs(np.asarray(zero.image, np.int16) - plain).max() <= 1
    # a unit's mask (webuiapi's mask=; the extension's effective region) reaches the engine's ip_adapter mask (whose
    # effect tests/engine/test_ip_adapter.py measures): the picture is neither the plain one nor the unmasked one
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    masked = webuiapi.ControlNetUnit(image=ref, mask=left, module="ip-adapter_clip_sd15", model="tiny-ip [0123abcd]")
    regional = np.asarray(api.txt2img(**{**args, "alwayson_scripts": {}}, controlnet_units=[masked]).image, np.int16)
    full = np.asarray(guided.image, np.int16)
    assert np.abs(regional - plain).max() > 8 and np.abs(regional - full).max() > 8
    face = webuiapi.ControlNetUnit(image=Image.fromarray(data.astronaut()), module="ip-adapter_face_id",
                                   model="tiny-faceid_sd15 [0123abcd]")
    by_face = api.txt2img(**{**args, "alwayson_scripts": {}}, controlnet_units=[face])
    assert np.abs(np.asarray(by_face.image, np.int16) - plain).max() > 8
    assert "tiny-faceid_sd15" in by_face.info["infotexts"][0]
    with pytest.raises(RuntimeError) as err:
        api.txt2img(**{**args, "alwayson_scripts": {}}, controlnet_units=[webuiapi.ControlNetUnit(
            image=ref, module="ip-adapter_face_id_plus", model="ip-adapter-faceid-plusv2_sd15 [abcd1234]")])
    assert "422" in str(err.value) and "no ipadapter named" in str(err.value) and "faceid-plusv2_sd15" in str(err.value)


def test_ultimate_sd_upscale_as_a1111_clients_call_it(api):
    """img2img with script_name "ultimate sd upscale" and its script_args in the script's own order: the picture
    comes back at the target size, repainted tile by tile; a target no larger than the image is a 422."""
    small = Image.fromarray((np.indices((48, 48)).sum(0) * 5 % 255).astype(np.uint8)).convert("RGB")
    # info, tile_w, tile_h, mask_blur, padding, seams_fix_w, seams_fix_denoise, seams_fix_padding, upscaler_index
    # (1: Lanczos), save_upscaled, redraw_mode (0 linear), save_seams, seams_mask_blur, seams_fix_type,
    # target_size_type (2: scale), custom_w, custom_h, custom_scale
    args = [None, 64, 64, 8, 16, 64, 0.35, 32, 1, False, 0, False, 8, 0, 2, 0, 0, 2.0]
    r = api.img2img(images=[small], prompt="a tiled floor", denoising_strength=0.3, steps=2, seed=3,
                    script_name="ultimate sd upscale", script_args=args, alwayson_scripts={})
    assert r.image.size == (96, 96)
    plain = small.resize((96, 96), Image.LANCZOS)
    assert np.abs(np.asarray(r.image, np.int16) - np.asarray(plain, np.int16)).mean() > 1  # repainted
    only = api.img2img(images=[small], prompt="x", steps=2, script_name="ultimate sd upscale",
                       script_args=args[:10] + [2] + args[11:], alwayson_scripts={})  # redraw mode None
    assert np.abs(np.asarray(only.image, np.int16) - np.asarray(plain, np.int16)).max() <= 1
    with pytest.raises(RuntimeError) as err:
        api.img2img(images=[small], prompt="x", steps=2, script_name="ultimate sd upscale",
                    script_args=args[:17] + [1.0], alwayson_scripts={})
    assert "422" in str(err.value) and "target width" in str(err.value)


def test_users_upscaler_and_face_restorer_files(api):
    """A user's spandrel upscaler (.pth) and face restorer: listed where webuiapi reads them, used by Extras
    (upscale, then GFPGAN visibility) and by txt2img's restore_faces (recorded as A1111 records it)."""
    import httpx
    import torch
    from safetensors.torch import save_file
    pytest.importorskip("spandrel")
    from spandrel.architectures.ESRGAN import ESRGAN
    from skimage import data

    from engine.test_restore_faces import tiny_restoreformer
    models = api.imagesmith_home / "models"
    (models / "upscalers").mkdir(parents=True, exist_ok=True)
    (models / "restorers").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save({"params_ema": ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict()},
               models / "upscalers" / "2x-Tiny.pth")
    save_file(tiny_restoreformer(), str(models / "restorers" / "RestoreFormer-tiny.safetensors"))
    try:
        upscalers = {u["name"]: u for u in api.get_upscalers()}
        assert upscalers["2x-Tiny"]["scale"] == 2 and "R-ESRGAN 4x+" in upscalers
        restorers = httpx.get(api.baseurl + "/face-restorers").json()
        assert [r["name"] for r in restorers] == ["RestoreFormer-tiny"]
        photo = Image.fromarray(data.astronaut()).resize((96, 96), Image.Resampling.LANCZOS)
        assert api.extra_single_image(photo, upscaler_1="2x-Tiny", upscaling_resize=2).image.size == (192, 192)
        plain = api.extra_single_image(photo, upscaler_1="Lanczos", upscaling_resize=2)
        restored = api.extra_single_image(photo, upscaler_1="Lanczos", upscaling_resize=2, gfpgan_visibility=1)
        assert plain.image.size == restored.image.size == (192, 192)
        diff = np.abs(np.asarray(plain.image, np.int16) - np.asarray(restored.image, np.int16)).max(2)
        assert diff[40:90, 60:110].mean() > 5 and diff[-30:, :30].max() == 0  # her face, not the corner
        bad = httpx.post(api.baseurl + "/extra-single-image", json={
            "image": webuiapi.raw_b64_img(photo), "upscaler_1": "2x-Tiny", "codeformer_visibility": 1})
        assert bad.status_code == 422 and "no CodeFormer installed" in bad.json()["detail"]
        assert "spandrel_extra_arches" in bad.json()["detail"] and "non-commercial" in bad.json()["detail"]
        both = httpx.post(api.baseurl + "/extra-single-image", json={
            "image": webuiapi.raw_b64_img(photo), "gfpgan_visibility": 1, "codeformer_visibility": 1})
        assert both.status_code == 422 and "give one of them" in both.json()["detail"]
        r = api.txt2img(prompt="a portrait", seed=2, width=64, height=64, restore_faces=True,
                        alwayson_scripts={})  # (the client's default dict keeps earlier tests' units)
        assert "Face restoration: RestoreFormer-tiny" in r.info["infotexts"][0]
    finally:
        (models / "upscalers" / "2x-Tiny.pth").unlink()
        (models / "restorers" / "RestoreFormer-tiny.safetensors").unlink()


def test_a1111_refiner_fields(api):
    """A1111 1.6's ``refiner_checkpoint`` / ``refiner_switch_at`` (webuiapi does not send them: a raw call to the
    same live server): the refiner takes over and the infotext says so; a refiner of another family is a 4xx."""
    import json
    import shutil

    import httpx

    from fixtures.tiny import build_sdxl_refiner
    ckpt = api.imagesmith_home / "models" / "checkpoints"
    tiny_models = (ckpt / "tiny-sd15").resolve().parent  # the session's tiny models, where tiny-sd15 links to
    (ckpt / "tiny-sdxl").symlink_to(tiny_models / "tiny-sdxl", target_is_directory=True)
    build_sdxl_refiner(3).save_pretrained(ckpt / "tiny-sdxl-refiner", safe_serialization=True)
    body = {"prompt": "a lighthouse", "seed": 3, "width": 64, "height": 64, "steps": 4, "cfg_scale": 5,
            "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}
    try:
        r = httpx.post(api.baseurl + "/txt2img", json={**body, "refiner_checkpoint": "tiny-sdxl-refiner",
                                                       "refiner_switch_at": 0.5}, timeout=300)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Refiner: tiny-sdxl-refiner" in info["infotexts"][0] and "Refiner switch at: 0.5" in info["infotexts"][0]
        plain = httpx.post(api.baseurl + "/txt2img", json={**body, "refiner_checkpoint": ""}, timeout=300)
        assert plain.status_code == 200 and "Refiner" not in json.loads(plain.json()["info"])["infotexts"][0]
        bad = httpx.post(api.baseurl + "/txt2img", json={**body, "refiner_checkpoint": "tiny-sd15"}, timeout=300)
        assert 400 <= bad.status_code < 500 and "one family" in bad.text, bad.text
        # A1111's "Hires fix: which pass to enable refiner for", as a per-request setting
        hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "denoising_strength": 0.6,
                 "hr_second_pass_steps": 2}
        both = httpx.post(api.baseurl + "/txt2img", json={
            **body, **hires, "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5,
            "override_settings": {**body["override_settings"], "hires_fix_refiner_pass": "both passes"}}, timeout=300)
        assert both.status_code == 200, both.text
        assert "Hires refiner: both passes" in json.loads(both.json()["info"])["infotexts"][0]
        wrong = httpx.post(api.baseurl + "/txt2img", json={
            **body, "override_settings": {**body["override_settings"], "hires_fix_refiner_pass": "all of them"}},
            timeout=300)
        assert wrong.status_code == 422 and "hires_fix_refiner_pass" in wrong.text, wrong.text
    finally:
        (ckpt / "tiny-sdxl").unlink()
        shutil.rmtree(ckpt / "tiny-sdxl-refiner")


def test_qwen_image_edit_through_img2img(api):
    """A Qwen-Image-Edit-2509 folder dropped into the running server's checkpoints: webuiapi's img2img with the
    model named in override_settings edits the picture by the instruction (the picture as the edit's reference,
    not as an img2img start), and the infotext names the model."""
    import json
    import shutil

    from fixtures.tiny import build_qwen_image
    ckpt = api.imagesmith_home / "models" / "checkpoints"
    build_qwen_image(0, edit="plus").save_pretrained(ckpt / "tiny-qwen-edit", safe_serialization=True)
    picture = Image.new("RGB", (64, 48), (200, 60, 40))
    try:
        result = api.img2img(images=[picture], prompt="make the red square blue", width=64, height=48, steps=2,
                             cfg_scale=1.0, seed=5, denoising_strength=0.5, alwayson_scripts={},
                             override_settings={"sd_model_checkpoint": "tiny-qwen-edit"},
                             override_settings_restore_afterwards=True)
        assert result.image.size == (64, 48)
        assert np.asarray(result.image.convert("L")).std() > 0.5
        info = json.loads(result.info) if isinstance(result.info, str) else result.info
        assert "Model: tiny-qwen-edit" in info["infotexts"][0]
        # several init_images on a multi-picture edit model: the others are Picture 2, 3 of the edit
        second = Image.new("RGB", (64, 48), (30, 160, 220))
        two = api.img2img(images=[picture, second], prompt="put picture 2's colour on picture 1", width=64,
                          height=48, steps=2, cfg_scale=1.0, seed=5, alwayson_scripts={},
                          override_settings={"sd_model_checkpoint": "tiny-qwen-edit"},
                          override_settings_restore_afterwards=True)
        assert two.image.size == (64, 48)
        one = api.img2img(images=[picture], prompt="put picture 2's colour on picture 1", width=64, height=48,
                          steps=2, cfg_scale=1.0, seed=5, alwayson_scripts={},
                          override_settings={"sd_model_checkpoint": "tiny-qwen-edit"},
                          override_settings_restore_afterwards=True)
        assert not np.array_equal(np.asarray(two.image), np.asarray(one.image))
        # on any other model A1111 would spread them over the batch: a 422 that says so, rather than a silent drop
        with pytest.raises(RuntimeError) as err:
            api.img2img(images=[picture, second], prompt="x", width=64, height=48, steps=1, alwayson_scripts={})
        assert "422" in str(err.value) and "one init image a request" in str(err.value)
    finally:
        shutil.rmtree(ckpt / "tiny-qwen-edit")


def test_a_units_mask_reaches_the_engine_in_both_of_the_extensions_forms():
    """The extension takes a unit's mask as `mask` (webuiapi's ControlNetUnit(mask=...)) or inside the image dict
    ({"image", "mask"}); either becomes the engine unit's mask (read by inpainting ControlNets), stored as an
    upload like the image."""
    import base64
    import io
    from imagesmith.serve.api.a1111_controlnet import _unit

    def encode_base64(im: Image.Image) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    stored: list[bytes] = []

    def upload(data: bytes) -> str:
        stored.append(data)
        return f"upload-{len(stored)}"
    picture, hole = _edges_image(), Image.new("L", (64, 64), 255)
    unit = webuiapi.ControlNetUnit(image=picture, mask=hole, module="none", model="qwen-inpaint").to_dict()
    spec = _unit(unit, upload)
    assert spec["image"] == "upload-1" and spec["mask"] == "upload-2" and len(stored) == 2
    spec = _unit({"model": "qwen-inpaint", "module": "none",
                  "image": {"image": encode_base64(picture), "mask": encode_base64(hole)}}, upload)
    assert spec["mask"] == "upload-4"
    assert "mask" not in _unit({"model": "m", "image": encode_base64(picture), "mask": None}, upload)
