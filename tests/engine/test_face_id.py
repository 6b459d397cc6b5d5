"""IP-Adapter FaceID: the identity embedding is InsightFace's (checked against InsightFace's own alignment and
ArcFace wrapper, a peer we did not write), the adapter's .bin is read as data and gives diffusers' own
projection, and a face reference guides a tiny SD1.5 as a reference should (weight 0: the base pixels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.tiny import (build_arcface_onnx, build_clip_vision, build_faceid_adapter, build_faceid_plus_adapter,
                           build_sd15)
from imagesmith.core.errors import BadRequest, ImagesmithError
from imagesmith.core.requests import GenerateRequest, IPAdapterSpec
from imagesmith.core.settings import Settings
from imagesmith.engine import face_id as F

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("faces") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return str(path)


@pytest.fixture(scope="module")
def home(tiny_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("faceid-home")
    settings = Settings(home=root)
    settings.ensure_home()
    (settings.models_dir / "checkpoints" / "tiny-sd15").symlink_to(
        tiny_home.models_dir / "checkpoints" / "tiny-sd15", target_is_directory=True)
    build_faceid_adapter(build_sd15(0).unet, settings.models_dir / "ipadapter" / "tiny-faceid_sd15.bin")
    build_faceid_plus_adapter(build_sd15(0).unet, settings.models_dir / "ipadapter" / "tiny-faceid-plusv2_sd15.bin")
    build_clip_vision(settings.models_dir / "clip_vision" / "tiny-vision")  # FaceID Plus reads the face through it
    buffalo = settings.models_dir / "insightface" / "models" / "buffalo_l"
    build_arcface_onnx(buffalo / "w600k_r50.onnx")
    _detector_onnx(buffalo / "det_10g.onnx")  # a decoy: InsightFace's detector lies beside it
    return settings


def _detector_onnx(path):
    class Det(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))
    torch.onnx.export(Det(), torch.zeros(1, 3, 64, 64), str(path), input_names=["input.1"], output_names=["score"],
                      dynamic_axes={"input.1": {0: "n", 2: "h", 3: "w"}}, dynamo=False)


@pytest.fixture(scope="module")
def engine(home):
    from imagesmith.engine.generate import Engine
    return Engine(home, device="cpu")


# ------------------------------------------------------------------------------- the identity embedding
@pytest.mark.parametrize("mxnet_style", [False, True])
def test_alignment_and_embedding_are_insightfaces(tmp_path, mxnet_style):
    """On a real photo (scikit-image's astronaut), for the five points mediapipe gives: the aligned crop equals
    InsightFace's norm_crop (max 1 level), and the embedding its ArcFaceONNX's normed_embedding, for both input
    conventions (the graph scaling its own input or not)."""
    import cv2
    from insightface.app.common import Face
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils import face_align
    rgb = skimage_data.astronaut()
    faces = F.face_points(Image.fromarray(rgb))
    assert len(faces) == 1
    box, points = faces[0]
    x0, y0, x1, y1 = box
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in points)  # the landmarks lie on the face
    assert points[0][0] < points[2][0] < points[1][0] and points[3][0] < points[4][0]  # eyes and mouth corners
    assert points[0][1] < points[2][1] < points[3][1]  # eyes above the nose above the mouth
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ours = F.align_face(rgb, points)
    theirs = face_align.norm_crop(bgr, points)[..., ::-1]
    assert ours.shape == (112, 112, 3) and np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    model = build_arcface_onnx(tmp_path / "w600k_r50.onnx", mxnet_style=mxnet_style)
    embedder = F.load_face_embedder(model)
    peer = ArcFaceONNX(model_file=str(model))
    peer.prepare(-1)
    assert (embedder.mean, embedder.std) == (peer.input_mean, peer.input_std) == \
        ((0.0, 1.0) if mxnet_style else (127.5, 127.5))
    face = Face(bbox=np.array(box, np.float32), kps=points, det_score=1.0)
    peer.get(bgr, face)
    ours_vec = F.identity_embedding(embedder, Image.fromarray(rgb))
    assert abs(float(np.linalg.norm(ours_vec)) - 1.0) < 1e-5
    assert np.abs(ours_vec - face.normed_embedding).max() < 1e-4


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = F.similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


def test_the_recognition_model_is_picked_and_a_detector_is_refused(home, tmp_path):
    folder = home.models_dir / "insightface" / "models" / "buffalo_l"
    assert F.pick_recognition_model(sorted(folder.glob("*.onnx"))).name == "w600k_r50.onnx"
    with pytest.raises(BadRequest, match="not a recognition"):
        F.load_face_embedder(folder / "det_10g.onnx")
    with pytest.raises(BadRequest, match="cannot be read"):
        (tmp_path / "broken.onnx").write_bytes(b"not onnx")
        F.load_face_embedder(tmp_path / "broken.onnx")


# ------------------------------------------------------------------------------------- the adapter file
def test_the_bin_is_read_as_data_and_gives_diffusers_projection(engine, home):
    """h94 ships FaceID as a .bin (a pickle): imagesmith reads its tensors without unpickling, and the image
    projection it builds gives the same tokens as diffusers' own load_ip_adapter (which torch.loads the file)."""
    from diffusers import StableDiffusionPipeline
    from imagesmith.engine.ip_adapter import adapter_kind, load_adapter_state
    path = home.models_dir / "ipadapter" / "tiny-faceid_sd15.bin"
    state = load_adapter_state(path)
    assert adapter_kind(state) == "FaceID" and state["image_proj"]["proj.0.weight"].shape == (1024, 512)
    entry = engine.registry.get("tiny-faceid_sd15", "ipadapter")
    assert entry.kind == "ipadapter" and entry.notes[0] == "IP-Adapter (FaceID), cross-attention width 32"
    ours = build_sd15(0)
    ours.unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    peer = StableDiffusionPipeline.from_pretrained(engine.checkpoint("tiny-sd15").path)
    peer.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    vec = torch.nn.functional.normalize(torch.randn(1, 1, 512), dim=-1)
    with torch.no_grad():
        a = ours.unet.encoder_hid_proj([vec])[0]
        b = peer.unet.encoder_hid_proj([vec])[0]
    assert a.shape == (1, 1, 4, 32) and torch.allclose(a, b, atol=1e-6)


def test_an_evil_bin_is_refused_unread(home, tmp_path):
    import pickle

    from imagesmith.core.errors import UnsafeModelFile
    from imagesmith.engine.ip_adapter import load_adapter_state
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)
    bad = tmp_path / "evil-faceid.bin"
    with bad.open("wb") as f:
        pickle.dump({"image_proj": Evil()}, f, protocol=2)
    with pytest.raises(UnsafeModelFile, match="never unpickles"):
        load_adapter_state(bad)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- generation
def _pixels(result):
    return np.asarray(result.images[0], np.int16)


def test_a_face_reference_guides_the_picture(engine, astronaut, tmp_path):
    base = dict(model="tiny-sd15", prompt="a portrait", width=64, height=64, steps=4, seed=7, sampler_name="Euler")
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    zero = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-faceid_sd15", image=astronaut,
                                                                            weight=0)))
    assert np.abs(_pixels(zero) - plain).max() <= 1  # weight 0: the base picture
    full = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-faceid_sd15",
                                                                            image=astronaut)))
    assert np.abs(_pixels(full) - plain).max() > 8
    assert 'IP-Adapter: "tiny-faceid_sd15 (1, 0-1)"' in full.records[0].infotext
    mirrored = tmp_path / "mirrored.png"
    Image.open(astronaut).transpose(Image.FLIP_LEFT_RIGHT).save(mirrored)  # the same face, another embedding
    other = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-faceid_sd15",
                                                                             image=str(mirrored))))
    assert np.abs(_pixels(other) - _pixels(full)).max() > 2
    again = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-faceid_sd15",
                                                                             image=astronaut)))
    assert np.array_equal(_pixels(again), _pixels(full))
    assert np.array_equal(_pixels(engine.generate(GenerateRequest(**base))), plain)  # the plain UNet again


def test_no_face_and_no_face_model_are_one_clear_line(engine, home, tmp_path):
    base = dict(model="tiny-sd15", prompt="x", width=64, height=64, steps=2)
    cat = tmp_path / "cat.png"
    Image.fromarray(skimage_data.chelsea()).save(cat)
    with pytest.raises(BadRequest, match=r"ip_adapter\[0\].image: no face found"):
        engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-faceid_sd15", image=str(cat))))
    with pytest.raises(ImagesmithError, match="no insightface named 'glintr100'"):
        engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-faceid_sd15", image=str(cat),
                                                                         face_model="glintr100")))


def test_cli_face_reference(home, astronaut, tmp_path, monkeypatch, capsys):
    import json

    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(home.home))
    tiny = ["-m", "tiny-sd15", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1"]
    out = tmp_path / "face.png"
    code, stdout, err = run_cli(capsys, "generate", "a portrait", *tiny, "--ip-adapter", "tiny-faceid_sd15", "--ref",
                                astronaut, "--face-model", "w600k_r50", "-o", str(out), "--json")
    assert code == 0, err
    assert "tiny-faceid_sd15" in json.loads(stdout)["images"][0]["infotext"] and out.is_file()
    code, stdout, err = run_cli(capsys, "models", "list", "--kind", "insightface", "--json")
    assert code == 0, err
    assert {e["name"] for e in json.loads(stdout)} >= {"w600k_r50", "det_10g"}
    cat = tmp_path / "cat.png"
    Image.fromarray(skimage_data.chelsea()).save(cat)
    bad = tmp_path / "never.png"
    code, _, err = run_cli(capsys, "generate", "x", *tiny, "--ip-adapter", "tiny-faceid_sd15", "--ref", str(cat),
                           "-o", str(bad))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "no face found" in lines[0] and not bad.exists(), err



# ------------------------------------------------------------------------------------------ FaceID Plus
def test_the_faceid_plus_layout_is_what_diffusers_converts():
    """The tiny FaceID Plus file is written in h94's names by inverting diffusers' converter; running that converter
    back gives a projection with the same output, so the layout the tests load is the real one."""
    from fixtures.tiny import faceid_plus_original_layout, faceid_plus_projection
    proj = faceid_plus_projection(32, 32, seed=4)
    original = faceid_plus_original_layout(proj)
    assert "perceiver_resampler.layers.0.0.to_kv.weight" in original and "proj.0.weight" in original
    back = build_sd15(0).unet._convert_ip_adapter_image_proj_to_diffusers(original, low_cpu_mem_usage=False)
    ids, clip = torch.randn(2, 512), torch.randn(2, 1, 5, 32)
    with torch.no_grad():
        proj.clip_embeds, back.clip_embeds = clip, clip
        assert torch.allclose(proj(ids), back(ids), atol=1e-6)


def test_faceid_plus_reads_the_identity_and_the_faces_clip_features(engine, astronaut):
    """FaceID PlusV2: the identity embedding and the aligned face's CLIP hidden states reach diffusers' projection
    together (packed), PlusV2's shortcut is on; weight 0 gives the base pixels, weight 1 changes them."""
    from imagesmith.engine.ip_adapter import PackedFaceIDPlus
    base = dict(model="tiny-sd15", prompt="a portrait", width=64, height=64, steps=3, seed=5, sampler_name="Euler")
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    unit = dict(model="tiny-faceid-plusv2_sd15", image=astronaut)
    seen = []
    pipe = engine.pipeline(engine.checkpoint("tiny-sd15")).value
    full = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(**unit)))
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]  # still loaded: the next job asks for it again
    assert isinstance(layer, PackedFaceIDPlus) and layer.inner.shortcut is True  # "plusv2" in the file name
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        zero = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(**unit, weight=0)))
    finally:
        hook.remove()
    assert np.abs(_pixels(zero) - plain).max() <= 1
    assert np.abs(_pixels(full) - plain).max() > 8
    packed = seen[0]  # [uncond + cond, 512 + 17 tokens x 32]: the tiny CLIP reads 32 px in 8 px patches, + class
    assert packed.shape == (2, 512 + 17 * 32)
    ident = packed[:, :512]
    assert torch.allclose(ident.norm(dim=-1).max(), torch.tensor(1.0), atol=1e-4) and ident.norm(dim=-1).min() == 0


def _sdxl_faceid(home, tiny_home, build, name: str, astronaut):
    """The tiny SDXL in ``home`` with a FaceID adapter ``name`` built for its UNet by ``build``; checks weight 0
    gives the base picture and weight 1 guides it; returns (engine, request fields, the guided result)."""
    from fixtures.tiny import build_sdxl
    from imagesmith.engine.generate import Engine
    sdxl = home.models_dir / "checkpoints" / "tiny-sdxl"
    if not sdxl.exists():
        sdxl.symlink_to(tiny_home.models_dir / "checkpoints" / "tiny-sdxl", target_is_directory=True)
    build(build_sdxl(0).unet, home.models_dir / "ipadapter" / f"{name}.bin")
    engine = Engine(home, device="cpu")
    base = dict(model="tiny-sdxl", prompt="a portrait", width=64, height=64, steps=3, seed=7, sampler_name="Euler")
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    zero = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model=name, image=astronaut, weight=0)))
    assert np.abs(_pixels(zero) - plain).max() <= 1
    full = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model=name, image=astronaut)))
    assert np.abs(_pixels(full) - plain).max() > 8
    return engine, base, full


def test_faceid_on_sdxl(home, tiny_home, astronaut):
    """ip-adapter-faceid_sdxl: the same identity projection at SDXL's width, its attention on SDXL's UNet (its
    2048-wide text states); weight 0 is the base picture, weight 1 guides it; an SD1.5 FaceID on SDXL is refused."""
    from imagesmith.core.errors import ImagesmithError
    engine, base, _ = _sdxl_faceid(home, tiny_home, build_faceid_adapter, "tiny-faceid_sdxl", astronaut)
    with pytest.raises(ImagesmithError):
        engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-faceid_sd15", image=astronaut)))


def test_faceid_plusv2_on_sdxl(home, tiny_home, astronaut):
    """ip-adapter-faceid-plusv2_sdxl: the identity and the face's CLIP features through the Plus projection at
    SDXL's width; weight 0 is the base picture, weight 1 guides it."""
    from fixtures.tiny import build_faceid_plus_adapter
    _, _, full = _sdxl_faceid(home, tiny_home, build_faceid_plus_adapter, "tiny-faceid-plusv2_sdxl", astronaut)
    assert 'tiny-faceid-plusv2_sdxl (1, 0-1)' in full.records[0].infotext
