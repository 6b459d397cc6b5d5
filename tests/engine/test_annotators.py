"""Line-art and soft-edge preprocessors on lllyasviel's annotator networks, checked against a peer: controlnet_aux
(Apache-2.0, the package ComfyUI's and diffusers' users run these files with). The test writes each network with
random weights as the released ``.pth`` files are laid out (torch.save of a state dict), imagesmith reads them as
data (never unpickled), and both tools make the detected map of the same real photo."""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import MissingModelFile, UnsupportedModel
from imagesmith.core.requests import ControlNetSpec
from imagesmith.core.settings import Settings
from imagesmith.engine.controlnet import preprocess, preprocessor_status

warnings.filterwarnings("ignore", category=FutureWarning)
aux_lineart = pytest.importorskip("controlnet_aux.lineart")
aux_anime = pytest.importorskip("controlnet_aux.lineart_anime")
aux_hed = pytest.importorskip("controlnet_aux.hed")


def _randomised(net: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, 0.0, std)
            torch.nn.init.normal_(m.bias, 0.0, std) if m.bias is not None else None
    return net.eval()


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """An imagesmith home whose annotators folder holds the networks in the Annotators repo's layout, and the
    same networks as controlnet_aux builds them."""
    settings = Settings(home=tmp_path_factory.mktemp("annotators-home"))
    settings.ensure_home()
    folder = settings.models_dir / "annotators" / "lllyasviel" / "Annotators"  # controlnet_aux's ckpts layout
    folder.mkdir(parents=True)
    fine = _randomised(aux_lineart.Generator(3, 1, 3), 1)
    coarse = _randomised(aux_lineart.Generator(3, 1, 3), 2)
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    anime = _randomised(aux_anime.UnetGenerator(3, 1, 8, 16, norm_layer=norm), 3)  # the released one: width 64
    torch.manual_seed(4)
    hed = aux_hed.ControlNetHED_Apache2().eval()  # torch's default initialisation: edges of every strength
    with torch.no_grad():
        hed.norm.copy_(torch.tensor([122.0, 116.0, 104.0]).view(1, 3, 1, 1))
    torch.save(fine.state_dict(), folder / "sk_model.pth")
    torch.save(coarse.state_dict(), folder / "sk_model2.pth")
    torch.save({"module." + k: v for k, v in anime.state_dict().items()}, folder / "netG.pth")  # as released
    torch.save(hed.state_dict(), folder / "ControlNetHED.pth")
    return settings, {"fine": fine, "coarse": coarse, "anime": anime, "hed": hed}


def _photo(size=(512, 384)) -> Image.Image:
    import skimage.data as data
    return Image.fromarray(data.astronaut()).resize(size, Image.LANCZOS)


def _ours(settings, module: str, image: Image.Image, res: int | None = None) -> np.ndarray:
    out = preprocess(image, ControlNetSpec(model="-", image="-", preprocessor=module, processor_res=res),
                     settings=settings)
    a = np.asarray(out)
    assert out.size == image.size and out.mode == "RGB" and (a[..., 0] == a[..., 2]).all()
    return a[..., 0].astype(np.int16)


def _theirs(detector, image: Image.Image, res: int, **kw) -> np.ndarray:
    out = detector(image, detect_resolution=res, image_resolution=res, output_type="pil", **kw)
    return np.asarray(out.convert("L")).astype(np.int16)


@pytest.mark.parametrize("module, net", [("lineart_realistic", "fine"), ("lineart_coarse", "coarse")])
def test_lineart_maps_equal_controlnet_aux(peers, module, net):
    settings, nets = peers
    photo = _photo()  # short side 384, sides multiples of 64: both tools work at the photo's own size
    detector = aux_lineart.LineartDetector(nets["fine"], nets["coarse"])
    theirs = _theirs(detector, photo, 384, coarse=module == "lineart_coarse")
    ours = _ours(settings, module, photo, 384)
    assert theirs.shape == ours.shape and theirs.std() > 10  # a map with something in it
    assert np.abs(theirs - ours).max() <= 1


def test_anime_lineart_map_equals_controlnet_aux(peers):
    settings, nets = peers
    photo = _photo()  # 384 high: the U-Net's input is stretched to 512 (a multiple of 256) and back, by both
    theirs = _theirs(aux_anime.LineartAnimeDetector(nets["anime"]), photo, 384)
    ours = _ours(settings, "lineart_anime", photo, 384)
    assert theirs.std() > 10 and np.abs(theirs - ours).max() <= 1


@pytest.mark.parametrize("module, kw", [("softedge_hed", {}), ("softedge_hedsafe", {"safe": True}),
                                        ("scribble_hed", {"scribble": True})])
def test_hed_maps_equal_controlnet_aux(peers, module, kw):
    settings, nets = peers
    photo = _photo((320, 256))
    theirs = _theirs(aux_hed.HEDdetector(nets["hed"]), photo, 256, **kw)
    ours = _ours(settings, module, photo, 256)
    assert theirs.std() > 5
    assert np.abs(theirs - ours).max() <= 1 and (theirs != ours).mean() < 0.001
    if module == "scribble_hed":
        assert set(np.unique(ours)) <= {0, 255}  # strokes, nothing in between


def test_maps_come_back_at_the_input_size_from_the_processor_resolution(peers):
    """An odd-sized photo: the network works at the short side scaled to processor_res (sides rounded to 64, as
    the extension does) and the map is returned at the photo's size; a higher resolution resolves finer lines."""
    settings, nets = peers
    photo = _photo((333, 250))
    low = _ours(settings, "lineart_realistic", photo, 128)
    high = _ours(settings, "lineart_realistic", photo, 512)
    assert low.shape == high.shape == (250, 333)
    detector = aux_lineart.LineartDetector(nets["fine"], nets["coarse"])
    import cv2
    worked = _theirs(detector, photo, 512)  # controlnet_aux returns it at the working size: 704x512
    assert worked.shape == (512, 704)
    theirs = cv2.resize(worked.astype(np.uint8), photo.size, interpolation=cv2.INTER_LINEAR).astype(np.int16)
    assert np.abs(theirs - high).max() <= 1  # the same working size and map, brought back to the photo's size
    assert np.abs(low - high).mean() > 2.0


def test_missing_files_are_named_and_listed(tmp_path):
    empty = Settings(home=tmp_path / "empty")
    empty.ensure_home()
    with pytest.raises(MissingModelFile, match=r"lineart_anime needs netG\.pth or netG\.safetensors .*annotators"):
        preprocess(_photo((64, 64)), ControlNetSpec(model="-", image="-", preprocessor="lineart_anime"), settings=empty)
    rows = {r["name"]: r for r in preprocessor_status(empty)}
    assert rows["canny"]["available"] and rows["openpose"]["available"]
    assert not rows["softedge_hed"]["available"] and "ControlNetHED.pth" in rows["softedge_hed"]["needs"]
    assert not rows["depth_midas"]["available"]


def test_the_files_are_found_and_listed(peers):
    settings, _ = peers
    rows = {r["name"]: r for r in preprocessor_status(settings)}
    assert rows["lineart_coarse"]["available"] and rows["lineart_coarse"]["file"].endswith("sk_model2.pth")
    assert rows["scribble_hed"]["kind"] == "softedge" and rows["lineart_anime"]["kind"] == "hardedge"


def test_a_pickle_with_code_in_it_is_refused_unrun(tmp_path):
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    (settings.models_dir / "annotators").mkdir(exist_ok=True)
    torch.save({"model0.1.weight": Evil()}, settings.models_dir / "annotators" / "sk_model.pth")
    with pytest.raises(UnsupportedModel, match="sk_model.pth: not read .*never unpickles"):
        preprocess(_photo((64, 64)), ControlNetSpec(model="-", image="-", preprocessor="lineart_realistic"),
                   settings=settings)
    assert not marker.exists()


def test_a_file_of_another_network_is_one_line(tmp_path, peers):
    _, nets = peers
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    from safetensors.torch import save_file
    (settings.models_dir / "annotators").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in nets["fine"].state_dict().items()},
              str(settings.models_dir / "annotators" / "ControlNetHED.safetensors"))
    with pytest.raises(UnsupportedModel, match="ControlNetHED.safetensors: not the softedge_hed network"):
        preprocess(_photo((64, 64)), ControlNetSpec(model="-", image="-", preprocessor="softedge_hed"),
                   settings=settings)


def test_controlnet_detect_and_preprocessors_from_the_cli(peers, tmp_path, monkeypatch, capsys):
    import json
    from fixtures.cli import run_cli
    settings, _ = peers
    monkeypatch.setenv("IMAGESMITH_HOME", str(settings.home))
    _photo((256, 192)).save(tmp_path / "photo.png")
    code, out, _ = run_cli(capsys, "controlnet", "detect", str(tmp_path / "photo.png"), "-p", "softedge_hed",
                           "--processor-res", "192", "-o", str(tmp_path / "hed.png"), "--json")
    assert code == 0 and json.loads(out)["width"] == 256 and Image.open(tmp_path / "hed.png").size == (256, 192)
    code, out, _ = run_cli(capsys, "controlnet", "preprocessors", "--json")
    assert code == 0 and any(x["name"] == "lineart_anime" and x["available"] for x in json.loads(out))
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "bare"))
    code, out, err = run_cli(capsys, "controlnet", "detect", str(tmp_path / "photo.png"), "-p", "lineart_realistic",
                             "-o", str(tmp_path / "none.png"))
    assert code != 0 and "sk_model.pth" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.png").exists()
    code, out, _ = run_cli(capsys, "controlnet", "preprocessors")
    assert code == 0 and any(line.startswith("lineart_realistic") and "unavailable" in line and "sk_model.pth" in line
                             for line in out.splitlines())
