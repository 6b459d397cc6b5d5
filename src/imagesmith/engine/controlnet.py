"""ControlNet preprocessors. OpenCV's Canny is built in; 'none' passes a ready-made control image."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..core.requests import ControlNetSpec


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def preprocess(image: Image.Image, spec: ControlNetSpec) -> Image.Image:
    if spec.preprocessor == "canny":
        return canny(image, spec.canny_low, spec.canny_high)
    return image.convert("RGB")
