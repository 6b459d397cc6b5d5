"""The request bodies of the A1111 routes, as A1111 1.10 documents them, for the OpenAPI schema.

The routes read the raw JSON themselves (A1111 clients send extra keys, nulls and the pre-1.9 spellings, all of
which must keep working), so these models only *describe* the bodies: ``/docs`` shows each field, and a fuzzer
(``make fuzz``) generates typed cases from them instead of arbitrary JSON. ``extra="allow"``: unknown keys are
part of the contract (SillyTavern sends its own ``url`` and ``auth``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Txt2ImgBody(_Body):
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = Field(None, description="names from styles.csv (/sdapi/v1/prompt-styles)")
    seed: int = Field(-1, description="-1: random; the chosen seed is in info.all_seeds")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description="A1111 or ComfyUI spelling, e.g. 'DPM++ 2M' / 'dpmpp_2m'")
    sampler_index: str | None = Field(None, description="pre-1.6 clients: the sampler's name")
    scheduler: str | None = Field(None, description="Automatic, Karras, Exponential, SGM Uniform, Simple, ...")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(20, ge=1)
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    denoising_strength: float | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    override_settings: dict[str, Any] | None = Field(None, description="sd_model_checkpoint, sd_vae, "
                                                     "CLIP_stop_at_last_layers, eta_noise_seed_delta, randn_source")
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] | None = Field(None, description="controlnet (units) and ADetailer args")


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(..., description="base64 images (the first is used)")
    mask: str | None = Field(None, description="base64 mask: white is repainted (inpainting)")
    mask_blur: int | None = None
    inpainting_fill: int = Field(1, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="'only masked': work on a crop around the mask")
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    include_init_images: bool = False


class PngInfoBody(_Body):
    image: str = Field(..., description="a base64 PNG (a data: URL too)")


class ExtrasSingleBody(_Body):
    image: str = Field(..., description="a base64 image")
    upscaling_resize: float = 2
    upscaler_1: str | None = None
    upscaler_2: str | None = None
    resize_mode: int = 0


class ExtrasBatchBody(_Body):
    imageList: list[dict[str, Any]] = Field(..., description="[{'data': base64, 'name': ...}]")
    upscaling_resize: float = 2
    upscaler_1: str | None = None


class StyleBody(_Body):
    name: str
    prompt: str = ""
    negative_prompt: str = ""


class DetectBody(_Body):
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = 64
    controlnet_threshold_b: float = 64


def body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route whose JSON body ``model`` describes."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
