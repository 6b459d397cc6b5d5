"""Face restoration: faces found on a real photograph, aligned to the 512 px template and pasted back only where
the face is; real spandrel face networks (a tiny RestoreFormer) from .pth and .safetensors files; the CLI, the
engine's infotext, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagesmith.core.errors import ModelNotFound, UnsupportedModel
from imagesmith.core.requests import RestoreFaces
from imagesmith.core.settings import Settings
from imagesmith.engine.restore import TEMPLATE_512, FaceRestorer

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.RestoreFormer import RestoreFormer  # noqa: E402


def astronaut(size: int = 256) -> Image.Image:
    from skimage import data
    return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)


def tiny_restoreformer() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # 6 levels: its attention runs at 16 px, as the real one's
    net = RestoreFormer(n_embed=16, embed_dim=32, ch=32, out_ch=3, ch_mult=(1,) * 6, num_res_blocks=1,
                        attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=512, z_channels=32,
                        double_z=False, enable_mid=True, head_size=8)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


class _Fixed(FaceRestorer):
    """The alignment and blending around a stand-in for the network (the network itself is tested below)."""

    def __init__(self, fn):
        super().__init__("stand-in.safetensors", cache_dir=Path("/nonexistent"), name="stand-in")
        self.fn = fn
        self.crops: list[np.ndarray] = []

    def _load(self):
        return None

    def restore_crop(self, face, fidelity=0.5):
        self.crops.append(face)
        return self.fn(face.astype(np.float32) / 255.0)


def test_the_face_is_aligned_to_the_template_and_only_the_face_changes():
    img = astronaut(256)
    grey = _Fixed(lambda f: np.full_like(f, 0.5))
    out, report = grey.restore(img)
    assert len(report.faces) == 1 and len(grey.crops) == 1
    x0, y0, x1, y1 = report.faces[0].box
    assert 80 < (x0 + x1) / 2 < 130 and 30 < (y0 + y1) / 2 < 80  # her face, upper middle of the photo
    # the aligned crop puts her eyes where the template has them: dark pupils near those points
    crop = grey.crops[0].astype(np.float32).mean(2)
    for ex, ey in TEMPLATE_512[:2]:
        around = crop[int(ey) - 12:int(ey) + 12, int(ex) - 12:int(ex) + 12]
        assert around.min() < crop[40:-40, 40:-40].mean() - 40  # the eye's dark part lies within 12 px
    a, b = np.asarray(img, np.int16), np.asarray(out, np.int16)
    changed = np.abs(a - b).max(2) > 8
    cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
    assert changed[cy, cx]  # the face was replaced
    far = np.ones_like(changed)
    pad = int(1.2 * (x1 - x0))
    far[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = False
    assert not changed[far].any()  # nothing beyond the face's neighbourhood moved
    half, _ = _Fixed(lambda f: np.full_like(f, 0.5)).restore(img, visibility=0.5)
    c = np.asarray(half, np.float32)[cy, cx]
    assert np.allclose(c, (a[cy, cx] + 127.5) / 2, atol=3)  # visibility blends, as A1111's GFPGAN visibility


def test_an_identity_network_gives_the_photo_back():
    img = astronaut(256)
    out, report = _Fixed(lambda f: f).restore(img)
    assert len(report.faces) == 1
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(out, np.int16))
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 12  # only the warp's resampling, no seam or shift


def test_no_face_no_change():
    flat = Image.new("RGB", (128, 128), (120, 160, 90))
    out, report = _Fixed(lambda f: np.zeros_like(f)).restore(flat)
    assert report.faces == [] and np.array_equal(np.asarray(out), np.asarray(flat))


@pytest.fixture
def restore_home(tmp_path) -> Settings:
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    return settings


def test_a_real_face_network_from_a_pth_restores_the_face(restore_home):
    path = restore_home.models_dir / "restorers" / "tiny-RestoreFormer.pth"
    torch.save({"params_ema": tiny_restoreformer()}, path)
    restorer = FaceRestorer(path, cache_dir=restore_home.home / "cache" / "models")
    assert restorer.architecture == "RestoreFormer"
    img = astronaut(256)
    out, report = restorer.restore(img)
    assert len(report.faces) == 1 and out.size == img.size
    x0, y0, x1, y1 = report.faces[0].box
    a, b = np.asarray(img, np.int16), np.asarray(out, np.int16)
    assert np.abs(a - b)[y0:y1, x0:x1].mean() > 10  # an untrained network paints something else there
    assert np.array_equal(a[-40:, :40], b[-40:, :40])  # far corner untouched
    assert list((restore_home.home / "cache" / "models").glob("tiny-RestoreFormer-*.safetensors"))


def test_engine_picks_restorers_by_name_and_refuses_what_is_not_one(restore_home):
    from imagesmith.engine.generate import Engine
    from spandrel.architectures.ESRGAN import ESRGAN
    engine = Engine(restore_home, device="cpu")
    with pytest.raises(ModelNotFound, match="no face restorer installed"):
        engine.face_restorer(None)
    save_file(tiny_restoreformer(), str(restore_home.models_dir / "restorers" / "rf.safetensors"))
    save_file({k: v.contiguous() for k, v in ESRGAN(num_filters=8, num_blocks=1).state_dict().items()},
              str(restore_home.models_dir / "restorers" / "not-a-face-net.safetensors"))
    engine.registry.scan()
    kinds = {e.name: (e.kind, e.arch) for e in engine.registry.list()}
    assert kinds["rf"] == ("restorer", "RestoreFormer")
    assert kinds["not-a-face-net"] == ("upscaler", "ESRGAN")  # spandrel says what it is, whatever the folder
    assert engine.face_restorer(None).name == "rf" and engine.face_restorer("RF").name == "rf"
    images, reports = engine.restore_faces([astronaut(192)], RestoreFaces(model="rf", visibility=0.7))
    assert reports[0]["model"] == "rf" and reports[0]["visibility"] == 0.7 and len(reports[0]["faces"]) == 1
    with pytest.raises(ModelNotFound):
        engine.face_restorer("not-a-face-net")  # listed as an upscaler, so not found among restorers
    wrong = FaceRestorer(restore_home.models_dir / "restorers" / "not-a-face-net.safetensors",
                         cache_dir=restore_home.home / "cache")
    with pytest.raises(UnsupportedModel, match="is a ESRGAN upscaler, not a face restorer"):
        wrong.restore(astronaut(64))


def test_generate_records_face_restoration_in_the_infotext(tiny_home, tmp_path):
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.engine.generate import Engine
    folder = tiny_home.models_dir / "restorers"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_restoreformer(), str(folder / "rf-gen.safetensors"))
    try:
        engine = Engine(tiny_home, device="cpu")
        req = GenerateRequest(prompt="a portrait", model="tiny-sd15", width=64, height=64, steps=2, seed=3,
                              restore_faces={"model": "rf-gen", "visibility": 0.5})
        result = engine.generate(req)
        record = result.records[0]
        assert "Face restoration: rf-gen" in record.infotext and "Face restoration visibility: 0.5" in record.infotext
        assert record.face_restoration["faces"] == []  # a 64 px picture of noise has no face: nothing pasted
        plain = engine.generate(req.model_copy(update={"restore_faces": None}))
        assert np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))
    finally:
        (folder / "rf-gen.safetensors").unlink()


def test_cli_upscale_then_restore_faces(restore_home, tmp_path, monkeypatch, capsys):
    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(restore_home.home))
    torch.save({"params_ema": tiny_restoreformer()}, restore_home.models_dir / "restorers" / "rf.pth")
    src = tmp_path / "astronaut.png"
    astronaut(128).save(src)
    out = tmp_path / "big.png"
    code, stdout, err = run_cli(capsys, "upscale", str(src), "--upscaler", "Lanczos", "--scale", "2",
                                "--restore-faces", "auto", "--restore-visibility", "0.8", "-o", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["face_restoration"]["model"] == "rf" and len(info["face_restoration"]["faces"]) == 1
    with Image.open(out) as im:
        assert im.size == (256, 256)
    code, stdout, err = run_cli(capsys, "upscale", str(src), "--upscaler", "Lanczos", "--scale", "2",
                                "--restore-faces", "nope", "-o", str(tmp_path / "x.png"))
    assert code != 0 and "nope" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
    code, stdout, err = run_cli(capsys, "models", "list", "--kind", "restorer", "--json")
    assert code == 0 and [e["arch"] for e in json.loads(stdout)] == ["RestoreFormer"]


def test_codeformer_through_spandrel_extra_arches_with_its_licence_stated(restore_home):
    """CodeFormer (its architecture only in spandrel_extra_arches, kept out of spandrel for its weights' licence):
    a release-layout .pth (params_ema) is listed as a face restorer whose note states the S-Lab License
    (non-commercial), is read as data, and restores the astronaut's face through the same alignment."""
    pytest.importorskip("spandrel_extra_arches")
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    from imagesmith.models.registry import Registry
    torch.manual_seed(0)
    net = CodeFormer(dim_embd=64, n_head=2, n_layers=1, codebook_size=32, latent_size=256,
                     connect_list=["32", "64", "128", "256"])
    with torch.no_grad():  # the fidelity blocks start at zero; a trained network's do not
        for name, p in net.named_parameters():
            if name.startswith("fuse_convs_dict."):
                p.normal_(0, 0.05)
    path = restore_home.models_dir / "restorers" / "codeformer-tiny.pth"
    torch.save({"params_ema": {k: v.contiguous() for k, v in net.state_dict().items()}}, path)
    (entry,) = [e for e in Registry(restore_home).list("restorer") if e.name == "codeformer-tiny"]
    assert entry.arch == "CodeFormer" and any("S-Lab License 1.0: non-commercial" in n for n in entry.notes)
    restorer = FaceRestorer(path, cache_dir=restore_home.home / "cache" / "models")
    assert restorer.architecture == "CodeFormer"
    img = astronaut(256)
    out, report = restorer.restore(img)
    assert len(report.faces) == 1
    x0, y0, x1, y1 = report.faces[0].box
    a, b = np.asarray(img, np.int16), np.asarray(out, np.int16)
    assert np.abs(a - b)[y0:y1, x0:x1].mean() > 5 and np.array_equal(a[:, :40], b[:, :40])  # only the face
    faithful, _ = restorer.restore(img, fidelity=1.0)  # A1111's CodeFormer weight reaches the network's w
    assert not np.array_equal(np.asarray(faithful), np.asarray(out))
