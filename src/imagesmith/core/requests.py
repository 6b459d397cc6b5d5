"""Typed requests and results. One concept, one name: these field names are the CLI flags, the API
fields, the Python arguments and the metadata keys. WebUI (A1111) names are used where users know them."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


from .settings import PerformanceMode
from .sampling_names import SAMPLER_NAMES, SCHEDULE_NAMES, canonical_schedule, split_sampler

SAMPLERS = tuple(s.label for s in SAMPLER_NAMES)
SCHEDULES = tuple(s.name for s in SCHEDULE_NAMES)
NOISE_MODES = ("a1111-cpu", "a1111-gpu", "comfy")
UPSCALERS = ("Latent", "Lanczos", "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B")


DETAILERS = ("face", "hand", "person")
"""What the detailer can detect and repaint (engine.detailer)."""
DETECTOR_MODELS = ("mediapipe_face", "mediapipe_face_full", "mediapipe_face_short", "mediapipe_hands",
                   "mediapipe_person", "face_haar")
"""The detectors: mediapipe's (its wheel ships them; ADetailer's names for the face ones) and OpenCV's Haar cascade."""
DEFAULT_DETECTOR = {"face": "mediapipe_face", "hand": "mediapipe_hands", "person": "mediapipe_person"}
_DETECTOR_KIND = {"mediapipe_face": "face", "mediapipe_face_full": "face", "mediapipe_face_short": "face", "face_haar": "face",
                  "mediapipe_hands": "hand", "mediapipe_person": "person"}


class DetailerOptions(BaseModel):
    """What the detailer does; the field names are the API's and the metadata's."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["face", "hand", "person"] = Field("face", description="what to detect and repaint")
    model: Literal["mediapipe_face", "mediapipe_face_full", "mediapipe_face_short", "mediapipe_hands",
                   "mediapipe_person", "face_haar"] | None = Field(
        None, description="the detector; default the kind's mediapipe model (face: mediapipe_face, the faces either "
        "of mediapipe's models finds: mediapipe_face_full for small faces, mediapipe_face_short for close ones; "
        "face_haar: OpenCV's frontal-face cascade)")
    confidence: float = Field(0.3, ge=0.0, le=1.0, description="a detection's least score (mediapipe models; "
                              "ADetailer's ad_confidence)")
    min_neighbors: int = Field(5, ge=1, le=50, description="face_haar's confidence: overlapping detections a face "
                               "needs (higher = fewer, surer faces)")
    min_size: int = Field(24, ge=8, le=4096, description="smallest detection side in pixels")
    max_faces: int = Field(4, ge=1, le=32, description="repaint at most this many detections, largest first")
    padding: float = Field(0.35, ge=0.0, le=2.0, description="context around each face, as a fraction of its "
                           "size on each side; the repainted crop and the blend stay inside this padded box")
    padding_pixels: int | None = Field(None, ge=0, le=1024, description="context around each detection in pixels "
                                       "instead (ADetailer's inpaint_only_masked_padding)")
    dilate: int = Field(4, ge=-64, le=64, description="grow the face box by this many pixels before blurring "
                        "(negative: shrink it; ADetailer's dilate/erode)")
    mask_blur: float = Field(4.0, ge=0.0, le=64.0, description="Gaussian sigma of the blend mask's edge, pixels")
    strength: float = Field(0.4, ge=0.0, le=1.0, description="denoising strength of the repaint")
    steps: int | None = Field(None, ge=1, le=150, description="steps of the repaint; default: the request's")
    size: int | None = Field(None, ge=64, le=2048, description="working size of the repaint's long side; "
                             "default: the model's native size")
    prompt: str = Field("", description="added to the image's prompt for the repaint; [SEP] separates one prompt "
                        "per detection (largest first; the last serves the rest), as ADetailer's")
    negative_prompt: str = Field("", description="added to the image's negative prompt for the repaint ([SEP] too)")
    prompt_mode: Literal["add", "replace"] = Field(
        "add", description="add: the unit's prompts are added to the image's; replace: they replace them where given "
        "(ADetailer's way, which the A1111 API uses; [PROMPT] in them stands for the image's prompt)")

    @model_validator(mode="after")
    def _model_fits_kind(self) -> "DetailerOptions":
        if self.model is not None and _DETECTOR_KIND[self.model] != self.kind:
            raise ValueError(f"detector {self.model} finds {_DETECTOR_KIND[self.model]}s, not {self.kind}s")
        return self

    @property
    def detector(self) -> str:
        return self.model or DEFAULT_DETECTOR[self.kind]


class LoraSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str = Field(..., description="LoRA name in the registry (file stem)")
    weight: float = Field(1.0, ge=-10, le=10, description="multiplier; 0 gives the base model's pixels")

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """'name:0.7' or 'name' (weight 1)."""
        name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
        try:
            return cls(name=name.strip(), weight=float(weight))
        except ValueError:
            from .errors import BadRequest
            raise BadRequest(f"bad LoRA spec {text!r}: use NAME:WEIGHT, e.g. mystyle:0.7") from None


class HiresSpec(BaseModel):
    hr_scale: float = Field(2.0, gt=1.0, le=4.0, description="upscale factor of the first pass")
    hr_upscaler: str = Field("Latent", description="Latent, Lanczos, R-ESRGAN 4x+, R-ESRGAN 4x+ Anime6B, or an "
                             "upscaler file's name (models list --kind upscaler)")
    hr_second_pass_steps: int = Field(0, ge=0, le=150, description="0: same as steps")
    hr_denoising_strength: float = Field(0.5, ge=0.0, le=1.0)


class ControlNetSpec(BaseModel):
    model: str = Field(..., description="ControlNet name in the registry (models/controlnet)")
    image: str = Field(..., description="path of the control image")
    preprocessor: Literal["canny", "none", "scribble_xdog", "lineart_standard", "invert", "threshold",
                          "tile_resample", "openpose", "openpose_hand", "openpose_face", "openpose_faceonly",
                          "openpose_full", "depth_anything", "depth_midas",
                          "depth_zoe", "lineart_realistic", "lineart_coarse", "lineart_anime", "softedge_hed",
                          "softedge_hedsafe", "scribble_hed", "inpaint_only", "inpaint_global_harmonious"] = Field(
        "canny", description="offline preprocessors (engine.controlnet; openpose*: mediapipe's pose, hand and face "
        "models; "
        "depth: your transformers depth model in models/annotators/; lineart_* and *_hed: lllyasviel's annotator "
        "files sk_model, sk_model2, netG, ControlNetHED in models/annotators/; inpaint_only and "
        "inpaint_global_harmonious: the picture with its hole (the unit's mask, else the request's) at -1, for the "
        "inpaint ControlNets)")
    control_mode: Literal["balanced", "prompt", "controlnet"] = Field(
        "balanced", description="A1111's Control Mode for SD1/SDXL ControlNets: balanced; prompt ('My prompt is more "
        "important': the residuals fade towards the network's outer layers, 0.825 per layer); controlnet "
        "('ControlNet is more important': those faded residuals on the prompt's half of CFG only)")
    mask: str | None = Field(None, description="for the inpaint preprocessors and inpainting ControlNets (SD1/SDXL "
                             "inpaint models, InstantX's Qwen-Image one): where to repaint (white), uploaded id or "
                             "path; default the request's mask")
    processor_res: int | None = Field(None, ge=64, le=4096, description="the resolution a network preprocessor "
                                      "works at (the image's short side scaled to it; the extension's "
                                      "processor_res); default 512")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    canny_low: int = Field(100, ge=0, le=255)
    canny_high: int = Field(200, ge=0, le=255)
    threshold_a: float | None = Field(None, description="the preprocessor's first slider (the extension's "
                                      "threshold_a): scribble_xdog's threshold, threshold's level, tile's rate")
    threshold_b: float | None = Field(None, description="its second slider, where it has one")
    union_mode: int | None = Field(None, ge=0, le=15, description="a union ControlNet's control type, by its "
                                   "index (FLUX InstantX/Shakker union: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, "
                                   "5 gray, 6 low quality)")
    union_type: Literal["openpose", "depth", "softedge", "hardedge", "normal", "segment", "tile", "inpaint", "blur",
                        "gray"] | None = Field(
        None, description="a union ControlNet's control type by name, for any union model (A1111's ControlNet "
        "extension's union_control_type); with neither this nor union_mode the preprocessor's kind is used")


class IPAdapterSpec(BaseModel):
    """A reference image through an IP-Adapter: its look guides the picture as a prompt would."""
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="IP-Adapter name in the registry (models/ipadapter, safetensors)")
    image: str = Field(..., description="the reference image: uploaded id or path")
    weight: float = Field(1.0, ge=0.0, le=2.0, description="how strongly it guides (0: as if it were not there)")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="from this fraction of the steps")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="to this fraction of the steps")
    image_encoder: str | None = Field(None, description="CLIP vision encoder in models/clip_vision; default: the "
                                      "one whose width the adapter takes")
    mask: str | None = Field(None, description="where the reference applies (white), uploaded id or path; "
                             "default everywhere")
    face_model: str | None = Field(None, description="IP-Adapter FaceID: the InsightFace recognition model (.onnx "
                                   "in models/insightface); default w600k_r50 / glintr100, whichever is there")


class RegionSpec(BaseModel):
    """A prompt for part of the picture (regional prompting): a box or a mask, its weight against the base prompt
    there, and how softly its edge blends."""
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1)
    box: tuple[float, float, float, float] | None = Field(
        None, description="x0, y0, x1, y1 as fractions of the width and height (0-1)")
    mask: str | None = Field(None, description="a mask image (white: the region), uploaded id or path")
    weight: float = Field(1.0, gt=0.0, le=10.0, description="against the base prompt's 1 inside the region")
    feather: int = Field(8, ge=0, le=256, description="pixels over which the edge blends")

    @model_validator(mode="after")
    def _one_shape(self):
        if (self.box is None) == (self.mask is None):
            raise ValueError("a region needs a box or a mask (one of them)")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"region box {list(self.box)} must be x0 < x1 and y0 < y1, all within 0-1")
        return self


class RestoreFaces(BaseModel):
    """Face restoration after the picture is made (A1111's "Restore faces", its Extras' GFPGAN visibility): every
    face found is aligned, restored by a GFPGAN/RestoreFormer network from the user's files and blended back."""
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=300, description="a restorer's name (models list --kind restorer); "
                              "None: the first one installed")
    visibility: float = Field(1.0, ge=0.0, le=1.0, description="how much of the restored face shows (1: all)")
    confidence: float = Field(0.5, gt=0.0, lt=1.0, description="the face detector's threshold")
    codeformer_weight: float = Field(0.5, ge=0.0, le=1.0, description="CodeFormer's fidelity w, A1111's "
                                     "'CodeFormer weight' (0: the most restoration, 1: the least); other networks "
                                     "have none")


class GenerateRequest(BaseModel):
    """One generation: txt2img, or img2img when init_image is set, or inpainting when mask is too."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="WebUI syntax: (word:1.2), [word], BREAK, <lora:name:0.7>")
    negative_prompt: str = ""
    malformed_prompt: Literal["error", "text"] = Field(
        "error", description="a malformed prompt-editing expression ('[a:b:x]', '[word:1.2]', a '[' never closed): "
        "an error naming it, or read as plain text, as A1111 does (its API sets text)")
    ground_concepts: bool = Field(True, description="house models: replace a subject the model was not trained "
                                  "on with the nearest concept it knows ('a cup of espresso' -> 'a cup of coffee'); "
                                  "reported as 'Concept:' in the infotext. No effect on other models")
    model: str | None = Field(None, description="checkpoint name; default: the default model")
    vae: str | None = Field(None, description="VAE override name (models/vae)")
    loras: list[LoraSpec] = Field(default_factory=list)
    clip_skip: int = Field(1, ge=1, le=12, description="WebUI meaning: 1 = last layer, 2 = penultimate")

    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    cfg_rescale: float = Field(0.0, ge=0.0, le=1.0, description="CFG rescale phi (Lin et al. 2023; A1111's CFG "
                               "Rescale, ComfyUI's RescaleCFG): 0.7 keeps v-prediction models from burning at high "
                               "CFG; SD1/SD2/SDXL models")
    sampler_name: str = Field("Euler a", description="A1111 or ComfyUI name: " + ", ".join(SAMPLERS)
                              + "; A1111's combined names ('DPM++ 2M Karras') carry their schedule")
    scheduler: str = Field("automatic", description="schedule type, A1111 or ComfyUI name: " + ", ".join(SCHEDULES)
                           + "; automatic = the sampler's own default, as in A1111")
    performance: PerformanceMode | None = Field(
        None, description="quality (lossless), fast (+ fp8 on Ada/Hopper GPUs), turbo (+ step caching); None: the "
        "server's default (IMAGESMITH_PERFORMANCE). A mode the device cannot run falls back to the nearest that "
        "works, and the infotext says so")
    noise: Literal["a1111-cpu", "a1111-gpu", "comfy"] = Field(
        "a1111-cpu", description="how the noise is drawn, to reproduce another tool's images: a1111-cpu (image i "
        "from seed + i on the CPU, A1111's 'CPU' RNG source), a1111-gpu (the same on the CUDA device), comfy (one "
        "draw over the whole batch, ComfyUI's; img2img strength then means ComfyUI's denoise)")
    eta_noise_seed_delta: int = Field(0, ge=0, lt=2**32, description="A1111's ENSD: offsets the seed of the "
                                      "sampler's own noise (ancestral/SDE) in a1111 noise modes")
    sgm_noise_multiplier: bool = Field(False, description="A1111's 'SGM noise multiplier': scale the start noise by "
                                       "sqrt(1 + sigma^2) as SDXL's reference code (and ComfyUI) do")

    seed: int = Field(-1, ge=-1, lt=2**64, description="-1: random; 64-bit seeds as in ComfyUI")
    variation_seed: int | None = Field(None, ge=-1, lt=2**64, description="WebUI subseed")
    variation_strength: float = Field(0.0, ge=0.0, le=1.0, description="WebUI subseed_strength")
    seed_resize_from_w: int = Field(0, ge=-1, le=8192, description="A1111's 'resize seed from' width: the seed's "
                                    "noise is drawn as for this width and placed in the middle, so a picture found "
                                    "at one size keeps its composition at another; 0 or -1: off")
    seed_resize_from_h: int = Field(0, ge=-1, le=8192, description="A1111's 'resize seed from' height (see width)")
    batch_size: int = Field(1, ge=1, le=16, description="images per run")
    batch_count: int = Field(1, ge=1, le=100, description="runs (WebUI n_iter)")

    width: int | None = Field(None, ge=8, le=8192, description="multiple of 8; default: model native")
    height: int | None = Field(None, ge=8, le=8192)

    init_image: str | None = Field(None, description="path; makes this img2img")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = Field(None, description="path; white = repaint. Needs init_image")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: Literal["fill", "original", "latent noise", "latent nothing"] = Field(
        "original", description="what the masked area starts from (A1111's 'Masked content'): the original pixels, "
        "the surrounding colours (fill), fresh noise, or nothing; matters most at high denoising strength")
    inpainting_mask_invert: bool = Field(False, description="repaint the black part of the mask instead")
    inpaint_full_res: bool = Field(False, description="A1111's 'Inpaint area: Only masked': repaint a crop around "
                                   "the mask at the full working size, then paste it back (sharper small edits)")
    inpaint_full_res_padding: int = Field(32, ge=0, le=1024, description="pixels of context around the mask for "
                                          "'only masked'")
    outpaint: tuple[int, int, int, int] | None = Field(
        None, description="pixels to add left, top, right, bottom (multiples of 8); needs init_image")
    edit_images: list[str] = Field(
        default_factory=list, max_length=3, description="more pictures for a multi-picture edit model "
        "(Qwen-Image-Edit-Plus, 2509 and later): with init_image, up to three in all, which the instruction calls "
        "'Picture 1', 'Picture 2', 'Picture 3'. On Qwen-Image 2.1, up to three condition pictures of their own "
        "(RGBA kept), without init_image, which the prompt calls Picture 1-3 (init_image stays img2img's start)")

    hires: HiresSpec | None = None
    controlnet: ControlNetSpec | list[ControlNetSpec] | None = Field(
        None, description="one ControlNet unit, or several (their residuals add up, as A1111's multi-unit ControlNet)")
    ip_adapter: IPAdapterSpec | list[IPAdapterSpec] | None = Field(
        None, description="reference images through IP-Adapters (SD1/SD2/SDXL): one, or up to 4, each with its "
        "weight and step window")
    detailer: DetailerOptions | list[DetailerOptions] | None = Field(
        None, description="ADetailer-style repaint after generation: one unit, or several run in turn (faces, then "
        "hands, ...), as ADetailer's tabs")
    regions: list[RegionSpec] = Field(default_factory=list, max_length=8, description="prompts for parts of the "
                                      "picture, blended with the base prompt (regional prompting)")
    restore_faces: RestoreFaces | None = Field(None, description="restore faces with a GFPGAN/RestoreFormer "
                                                 "network after generation (and after any detailer)")
    refiner_checkpoint: str | None = Field(None, max_length=300, description="A1111's refiner: this checkpoint "
                                           "(an SDXL refiner, or any model of the base's family) takes over the "
                                           "sampling at refiner_switch_at")
    refiner_switch_at: float = Field(0.8, gt=0.0, le=1.0, description="the fraction of the steps the base model "
                                     "runs before the refiner takes over (1: no refiner)")
    refiner_pass: Literal["first pass", "second pass", "both passes"] = Field(
        "second pass", description="with the hires fix's second diffusion pass: which pass the refiner takes the last "
        "steps of (A1111's 'Hires fix: which pass to enable refiner for'); without it, the only pass")

    @field_validator("detailer", "ip_adapter")
    @classmethod
    def _one_to_four_units(cls, v, info):
        if isinstance(v, list) and not 1 <= len(v) <= 4:
            raise ValueError(f"give 1 to 4 {info.field_name} units, not {len(v)}")
        return v

    @property
    def ip_adapter_units(self) -> list[IPAdapterSpec]:
        d = self.ip_adapter
        return [] if d is None else list(d) if isinstance(d, list) else [d]

    @property
    def detailer_units(self) -> list[DetailerOptions]:
        d = self.detailer
        return [] if d is None else list(d) if isinstance(d, list) else [d]

    @property
    def controlnet_units(self) -> list[ControlNetSpec]:
        """The ControlNet units as a list (empty when there is none)."""
        if self.controlnet is None:
            return []
        return list(self.controlnet) if isinstance(self.controlnet, list) else [self.controlnet]

    @field_validator("sampler_name")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        try:
            split_sampler(v)
        except Exception as e:  # BadRequest -> pydantic's ValueError, one clear line
            raise ValueError(str(e)) from None
        return v

    @field_validator("scheduler")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        try:
            return canonical_schedule(v)
        except Exception as e:
            raise ValueError(str(e)) from None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"{v} is not a multiple of 8")
        return v

    @field_validator("outpaint")
    @classmethod
    def _outpaint_multiple_of_8(cls, v):
        if v is not None and any(p < 0 or p % 8 for p in v):
            raise ValueError("outpaint pads must be non-negative multiples of 8")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "GenerateRequest":
        if self.mask and not self.init_image:
            raise ValueError("a mask needs an init_image")
        if self.outpaint and not self.init_image:
            raise ValueError("outpaint needs an init_image")
        if self.mask and self.outpaint:
            raise ValueError("use either mask or outpaint, not both")
        if self.inpaint_full_res and self.outpaint:
            raise ValueError("inpaint_full_res works on a mask, not with outpaint")
        if self.seed_resize and self.noise != "a1111-cpu":
            raise ValueError("seed_resize_from_w/h is A1111's and works with noise 'a1111-cpu'")
        return self

    @property
    def seed_resize(self) -> tuple[int, int] | None:
        """(width, height) the seed's noise is drawn for, when A1111's 'resize seed from' is on (both above 0)."""
        if self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0:
            return self.seed_resize_from_w, self.seed_resize_from_h
        return None

    @property
    def mode(self) -> str:
        if self.init_image and (self.mask or self.outpaint):
            return "inpaint"
        if self.init_image:
            return "img2img"
        return "txt2img"


class ImageRecord(BaseModel):
    """What is known about one produced image (also its PNG metadata)."""

    seed: int
    variation_seed: int | None = None
    infotext: str
    index: int = Field(..., description="position in the whole job (batch_count x batch_size)")
    detailer: dict | None = Field(None, description="what the face detailer did (faces, boxes, options)")
    face_restoration: dict | None = Field(None, description="what face restoration did (model, visibility, faces)")


class GenerationResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    images: list = Field(default_factory=list, description="PIL images")
    records: list[ImageRecord] = Field(default_factory=list)
    request: GenerateRequest
    model_name: str
    model_hash: str | None = None
    lora_hashes: dict[str, str] = Field(default_factory=dict)
    vae_name: str | None = None
    version: str
    seconds: float = 0.0
    control_maps: list = Field(default_factory=list, exclude=True, description="A1111's detected maps: "
                               "{unit, preprocessor, image (PIL)} for each ControlNet unit whose preprocessor made "
                               "its control image, as the ControlNet saw it")
    latents: object = Field(None, exclude=True, description="the final latents before the VAE, [N, C, h, w] "
                            "float32 on the CPU, one row per image (before any face detailer pass); None for an "
                            "upscale-only hires fix")


AD_POSITIONS = ("auto", "center", "bottom", "left", "right")


class CheckedSampling(BaseModel):
    """Checks a request's ``sampler_name`` and ``scheduler`` against GenerateRequest's vocabulary: the base of
    the workflow requests (ad, restyle, storyboard) that carry those two fields."""

    @field_validator("sampler_name", check_fields=False)
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        return GenerateRequest._known_sampler(v)

    @field_validator("scheduler", check_fields=False)
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        return GenerateRequest._known_schedule(v)


class AdRequest(CheckedSampling):
    """One call of the product-ad studio: product photos x formats x variations.

    Field names follow GenerateRequest where they mean the same (seed, steps, cfg_scale, sampler_name,
    scheduler, model, negative_prompt)."""

    products: list[str] = Field(..., min_length=1, description="product photo paths (RGBA used as-is)")
    concept: str = Field(..., min_length=1, description="the scene to paint around the product")
    negative_prompt: str = Field("text, watermark, logo, blurry, lowres")
    headline: str = Field(..., min_length=1, max_length=120)
    subline: str | None = Field(None, max_length=200)
    cta: str | None = Field(None, max_length=40, description="call-to-action button label")
    brand_color: str | None = Field(None, description="#rrggbb; honoured where contrast allows")
    formats: list[str] = Field(default_factory=lambda: ["1:1", "4:5", "9:16", "1.91:1"],
                               description="1:1, 4:5, 9:16, 1.91:1, 300x250, 728x90, 300x600, 320x50, social, display, all")
    variations: int = Field(1, ge=1, le=16, description="backgrounds per product and format")
    seed: int = Field(-1, ge=-1, lt=2**32, description="-1: random; variation i uses seed + i")
    model: str | None = Field(None, description="checkpoint that paints the background; default: the default model")
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(5.0, ge=0.0, le=30.0)
    sampler_name: str = Field("DPM++ 2M")
    scheduler: str = Field("karras")
    upscaler: str = Field("R-ESRGAN 4x+", description="brings the painted scene to the format's size, and a product "
                          "the format shows larger than its pixels (Lanczos: neither is enhanced)")
    position: Literal["auto", "center", "bottom", "left", "right"] = "auto"
    product_scale: float | None = Field(None, gt=0.05, le=1.0, description="fraction of the product area; default auto")
    shadow: bool = True
    shadow_direction: float = Field(90.0, ge=0.0, lt=360.0, description="degrees; 90 = light from above")
    shadow_softness: float = Field(0.5, ge=0.0, le=1.0)
    shadow_opacity: float = Field(0.45, ge=0.0, le=1.0)
    reflection: bool = False
    copy_blur: float = Field(0.02, ge=0.0, le=0.1, description="defocus the scene under the copy: blur sigma "
                             "as a fraction of the short side (a shallow depth of field); 0 = off")
    harmonize: Literal["off", "edge", "full"] = Field(
        "off", description="off keeps product pixels unchanged (guaranteed); edge/full recolour them")
    segmenter: str | None = Field(None, description="segmenter name (default house-cutout)")
    product_box: list[float] | None = Field(
        None, min_length=4, max_length=4, description="'this one': x0,y0,x1,y1 around the product in the photo "
        "(pixels, or fractions 0..1); the cut-out then looks only there (one product photo)")
    product_point: list[float] | None = Field(
        None, min_length=2, max_length=2, description="'this one': x,y of a tap on the product (pixels or "
        "fractions 0..1); the part of the cut-out under it is kept (one product photo)")
    background: Literal["auto", "paint", "studio"] = Field(
        "auto", description="paint: the checkpoint paints the scene; studio: a crisp surface, wall and light built "
        "from the concept's words at the format's full size; auto: studio for the shipped 128 px house model, "
        "paint for your own checkpoints")
    min_cutout_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="a cut-out scoring below this is not used: the ad is refused, asking for "
        "product_box or product_point; 0 accepts any cut-out")
    props: Literal["auto", "keep", "clear"] = Field(
        "auto", description="objects the model painted away from the product: clear repaints them as backdrop, "
        "keep leaves them; auto clears them in banners (cropped from a wider scene) and for house models")

    @model_validator(mode="after")
    def _guide_needs_one_product(self) -> "AdRequest":
        if (self.product_box is not None or self.product_point is not None) and len(self.products) != 1:
            raise ValueError("product_box and product_point point into one photo: give exactly one product")
        return self


class CutoutRequest(BaseModel):
    """Background removal of one image."""
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="an uploaded file id (the service) or a path (Python)")
    product_box: list[float] | None = Field(None, min_length=4, max_length=4,
                                            description="x0,y0,x1,y1 around the product (pixels or fractions 0..1)")
    product_point: list[float] | None = Field(None, min_length=2, max_length=2,
                                              description="x,y of a point on the product (pixels or fractions)")
    min_confidence: float | None = Field(None, ge=0.0, le=1.0, description="refuse (422) a cut-out scoring below "
                                         "this; default: return it with its confidence")
    segmenter: str | None = Field(None, description="segmenter name (default house-cutout)")


class TiledRefine(CheckedSampling):
    """The img2img pass of a tiled upscale ("Ultimate SD Upscale"): each tile repainted with its context."""
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint; default: the default one")
    prompt: str = Field("", description="what the picture shows (helps the repaint add the right detail)")
    negative_prompt: str = ""
    strength: float = Field(0.3, ge=0.0, le=1.0, description="denoising strength of each tile's repaint")
    steps: int = Field(20, ge=1, le=150)
    sampler_name: str = "Euler a"
    scheduler: str = "automatic"
    cfg_scale: float = Field(7.0, ge=1.0, le=30.0)
    seed: int = Field(-1, ge=-1, lt=2**32, description="tile i uses seed + i; -1: random")
    tile: int = Field(512, ge=64, le=2048, description="tile side in output pixels (the model's native size is "
                      "a good choice)")
    padding: int = Field(32, ge=0, le=512, description="context around each tile, pixels")
    mask_blur: int = Field(16, ge=0, le=256, description="width of each tile's feathered edge, pixels (at most "
                           "twice the padding)")
    order: Literal["linear", "chess"] = Field("linear", description="reading order, or a chessboard's white "
                                              "squares first, then the black ones (each seeing four repainted "
                                              "neighbours), as Ultimate SD Upscale's redraw modes")

    @model_validator(mode="after")
    def _blur_inside_padding(self) -> "TiledRefine":
        if self.mask_blur > 2 * self.padding:
            raise ValueError(f"mask_blur {self.mask_blur} needs padding of at least {math.ceil(self.mask_blur / 2)}"
                             f" (the feathered edge reaches half of it past the tile); padding is {self.padding}")
        return self


class UpscaleRequest(BaseModel):
    """One image made larger by an upscaler, optionally then repainted tile by tile (``refine``)."""
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="an uploaded file id (the service) or a path (Python)")
    scale: float = Field(4.0, gt=1, le=8, description="how many times larger, in (1, 8]")
    upscaler: str = Field("R-ESRGAN 4x+", min_length=1, max_length=300,
                          description="Lanczos, R-ESRGAN 4x+, R-ESRGAN 4x+ Anime6B or an upscaler file's name "
                          "(models list --kind upscaler)")
    refine: TiledRefine | None = Field(None, description="then img2img over tiles (Ultimate SD Upscale)")
    restore_faces: RestoreFaces | None = Field(None, description="then restore the faces (A1111 Extras' GFPGAN)")


class DescribeRequest(BaseModel):
    """``imagesmith describe`` / the service's ``describe`` job: caption, tags, ImageNet classes, colours."""
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="an uploaded file id or a path the service may read")
    top: int = Field(5, ge=1, le=50, description="how many tags")
    captioner: str | None = Field(None, description="a BLIP/VLM folder or a name under models/captioners")
    question: str | None = Field(None, max_length=300, description="BLIP's text prefix or the VLM's instruction")
    clip: str | None = Field(None, max_length=200, description="the CLIP that names the object and the tags: "
                             "house-clip (default) or a registered transformers CLIP (models list --kind clip)")

    @model_validator(mode="after")
    def _question_needs_captioner(self) -> "DescribeRequest":
        if self.question and not self.captioner:
            raise ValueError("question steers a model captioner: give captioner too")
        return self


class ClassifyRequest(BaseModel):
    """``imagesmith classify`` / the ``classify`` job: exactly one of labels (zero-shot), imagenet or gate."""
    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(..., min_length=1, max_length=64, description="uploaded file ids or paths")
    labels: list[str] | None = Field(None, min_length=2, max_length=1000, description="zero-shot labels (a CLIP)")
    imagenet: bool = Field(False, description="the 1,000 ImageNet classes (EfficientNet-Lite0)")
    gate: str | None = Field(None, description="a trained gate's name")
    top: int = Field(5, ge=1, le=1000)
    clip: str | None = Field(None, max_length=200, description="zero-shot on this CLIP: house-clip (default) or a "
                             "registered transformers CLIP (models list --kind clip); a gate uses its own")

    @model_validator(mode="after")
    def _one_mode(self) -> "ClassifyRequest":
        if (self.labels is not None) + self.imagenet + (self.gate is not None) != 1:
            raise ValueError("give exactly one of labels, imagenet or gate")
        return self


class PromptExpandRequest(BaseModel):
    """``imagesmith prompt expand`` / the ``prompt_expand`` job."""
    model_config = ConfigDict(extra="forbid")

    request: str = Field(..., min_length=1, max_length=500, description="a short request, e.g. 'a white cat, 3D'")
    n: int = Field(5, ge=1, le=20)
    seed: int = Field(0, ge=0, lt=2**32)
