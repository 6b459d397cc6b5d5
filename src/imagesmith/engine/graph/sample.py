"""KSampler for graphs: the engine's sampling layer (ComfyUI's schedules, samplers and noise) driven by ComfyUI
conditioning lists.

Several conditioning entries (ConditioningCombine), areas (ConditioningSetArea) and masks (ConditioningSetMask)
follow ComfyUI's rule: each entry predicts on its area, weighted by its strength and mask, and the predictions
are averaged where they overlap; CFG then mixes the positive and negative averages. The plain case, one entry a
side and nothing else, runs the engine's own batched UNet denoiser."""

from __future__ import annotations

from dataclasses import replace

import torch

from ...core.errors import BadRequest, UnsupportedModel
from ...core.sampling_names import resolve_sampling
from ..loras import ResolvedLora, apply_loras
from ..sampling import ksampler as K
from ..sampling.denoisers import Conditioning, ControlSpec, FluxDenoiser, QwenDenoiser, SD3Denoiser, UNetDenoiser
from ..sampling.model_sampling import DiscreteModelSampling, FlowModelSampling
from .values import Cond, ModelValue

UNET_ARCHS = ("sd1", "sd2", "sdxl", "house")


def vae_module(engine, vae):
    """The VAE module of a VaeValue: a VAELoader's file, or a checkpoint's own."""
    if vae.name is not None:
        return engine.component("vae", vae.name)
    return engine.pipeline(vae.entry).value.vae


def resolved_loras(loras) -> list[ResolvedLora]:
    merged: dict[str, ResolvedLora] = {}
    for l in loras:  # the same file twice: strengths add up, as two patches would
        prev = merged.get(l.path)
        weight = l.strength + (prev.weight if prev else 0.0)
        merged[l.path] = ResolvedLora(l.name, l.path, weight, l.arch, l.mtime_ns)
    return list(merged.values())


def model_sampling_for(engine, pipe, model: ModelValue, width: int, height: int):
    if not model.sampling and model.entry.arch == "qwen":  # ComfyUI's Qwen-Image default: shift 1, t = sigma
        return FlowModelSampling(shift=1.0, multiplier=1.0, timesteps=1000)
    ms = engine.model_sampling(pipe, model.entry.arch, width, height)
    if not model.sampling:
        return ms
    kind = model.sampling[0]
    if kind == "discrete":
        prediction, zsnr = model.sampling[1], model.sampling[2]
        if prediction not in ("eps", "v_prediction"):
            raise BadRequest(f"ModelSamplingDiscrete: sampling {prediction!r} is not supported (eps, v_prediction)")
        if not isinstance(ms, DiscreteModelSampling):
            raise BadRequest("ModelSamplingDiscrete applies to SD1/SD2/SDXL models")
        ms = replace_prediction(ms, "epsilon" if prediction == "eps" else "v_prediction", zsnr)
        return ms
    if kind == "sd3":
        return FlowModelSampling(shift=float(model.sampling[1]), multiplier=1000.0 if model.entry.arch == "sd3"
                                 else 1.0, timesteps=1000)
    if kind == "flux":
        _, max_shift, base_shift, w, h = model.sampling
        tokens = (h // 16) * (w // 16)
        m = (max_shift - base_shift) / (4096 - 256)
        mu = tokens * m + (base_shift - m * 256)
        return FlowModelSampling(mu=float(mu), multiplier=1.0, timesteps=10000)
    return ms


def replace_prediction(ms: DiscreteModelSampling, prediction: str, zsnr: bool) -> DiscreteModelSampling:
    if zsnr:
        raise BadRequest("ModelSamplingDiscrete: zsnr is not supported yet")
    return replace(ms, prediction=prediction)


def ksample(ctx, model: ModelValue, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
            positive: list[Cond], negative: list[Cond], latent: dict, *, denoise: float = 1.0,
            add_noise: bool = True, start_at_step: int | None = None, end_at_step: int | None = None,
            leftover_noise: bool = False, sigmas: torch.Tensor | None = None, denoised_out: list | None = None) -> dict:
    """KSampler / KSamplerAdvanced, and the custom sampling nodes: with ``sigmas`` (a SIGMAS value) the schedule is
    taken as it is (``steps``/``scheduler`` unused), and ``denoised_out`` (a list) receives the last step's x0
    estimate as SamplerCustomAdvanced's second output."""
    engine = ctx.engine
    entry = engine.pipeline(model.entry)
    samples = latent["samples"]
    arch = model.entry.arch
    for side, conds in (("positive", positive), ("negative", negative)):
        for c in conds:
            if _family(c.arch) != _family(arch):
                raise BadRequest(f"the {side} conditioning was encoded for {c.arch}, but the model is {arch}")
    with entry.use():
        pipe = entry.value
        apply_loras(pipe, entry.state, resolved_loras(model.loras), arch)
        if entry.state.get("ip_adapters"):  # left by an IP-Adapter job on this model: the plain UNet here
            from ..ip_adapter import ensure_loaded
            ensure_loaded(pipe.unet, entry.state, [])
        vae_sf = getattr(pipe, "vae_scale_factor", 8)
        height, width = samples.shape[-2] * vae_sf, samples.shape[-1] * vae_sf
        ms = model_sampling_for(engine, pipe, model, width, height)
        channels = _latent_channels(pipe, arch)
        if samples.shape[1] != channels:
            raise BadRequest(f"the latent has {samples.shape[1]} channels but {model.entry.name} works on {channels}"
                             f" (use {'EmptySD3LatentImage' if channels == 16 else 'EmptyLatentImage'})")
        sampler, schedule = resolve_sampling(sampler_name, scheduler, flow=ms.is_flow)
        family = "sdxl" if arch == "sdxl" else "sd1"
        if sigmas is None:
            sigmas = K.plan_sigmas(ms, sampler, schedule, steps, denoise=denoise if denoise < 0.9999 else None,
                                   family=family)
        if start_at_step is not None or end_at_step is not None:
            sigmas = K.clip_steps(sigmas, start_at_step=start_at_step, end_at_step=end_at_step,
                                  return_with_leftover_noise=leftover_noise)
        n = samples.shape[0]
        noise = K.initial_noise("comfy", tuple(samples.shape), [seed]) if add_noise else torch.zeros_like(samples)
        mask = latent.get("noise_mask")
        if mask is not None:
            mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(),
                                                   size=samples.shape[-2:], mode="bilinear")
            mask = mask.repeat(n // mask.shape[0] + 1, 1, 1, 1)[:n] if mask.shape[0] != n else mask
        net = getattr(pipe, "unet", None) or pipe.transformer
        concat = None
        if arch == "flux" and net.config.in_channels > (net.config.out_channels or net.config.in_channels):
            concat = _flux_concat(positive + negative, samples, vae_sf,
                                  net.config.in_channels - (net.config.out_channels or net.config.in_channels))
        elif getattr(net.config, "in_channels", channels) == channels * 2 + 1:
            # an inpainting UNet (9 channels): the mask and the masked image's latent ride along, as ComfyUI gives
            # them (InpaintModelConditioning's, else VAEEncodeForInpaint's grey-filled latent); without a mask, all of
            # it is repainted
            given = next((c for c in positive + negative if c.extra.get("concat_latent_image") is not None), None)
            if given is not None:
                m = torch.nn.functional.interpolate(given.extra["concat_mask"].float().reshape(
                    -1, 1, *given.extra["concat_mask"].shape[-2:]), size=samples.shape[-2:], mode="bilinear")
                masked = given.extra["concat_latent_image"].float()
                concat = torch.cat([m, masked], dim=1)
                concat = concat.repeat(n // concat.shape[0], 1, 1, 1) if concat.shape[0] != n else concat
            else:
                m = mask if mask is not None else torch.ones_like(samples[:, :1])
                concat = torch.cat([m, samples.float() if mask is not None else torch.zeros_like(samples)], dim=1)
        denoiser = build_denoiser(engine, pipe, net, arch, ms, positive, negative, cfg, n, width, height,
                                  concat=concat)
        if model.post_cfg:
            if not isinstance(denoiser, Guided):
                raise BadRequest("CFGNorm applies to the conditioning-list sampler (a model patch ComfyUI runs after "
                                 "CFG); this model's plain path has no such step")
            denoiser.post_cfg = model.post_cfg
        total = max(len(sigmas) - 1, 0)
        if total == 0:  # ComfyUI's samplers return the latent untouched for an empty schedule
            if denoised_out is not None:
                denoised_out.append(samples.float())
            return {**latent, "samples": samples.float()}

        def on_step(i, x, denoised, sigma):
            if denoised_out is not None:
                denoised_out[:] = [denoised]
            ctx.step(i + 1, total)

        with torch.inference_mode():
            out = K.sample(denoiser, ms, sampler, sigmas.to(torch.float32), noise=noise.float(),
                           latent=samples.float(), seed=seed, noise_mode="comfy", denoise_mask=mask,
                           add_noise=add_noise, callback=on_step, differential=model.differential)
    if denoised_out:
        denoised_out[:] = [denoised_out[0].float().cpu()]
    return {**latent, "samples": out.float().cpu()}


def _flux_concat(conds: list[Cond], samples: torch.Tensor, vae_sf: int, features: int) -> torch.Tensor:
    """What a FLUX model that reads more than its latent takes beside it, from the conditioning's
    ``concat_latent_image``: FLUX Fill (320 more features a token) the masked picture's latent and
    ``concat_mask`` as 8x8-pixel cells (InpaintModelConditioning), FLUX Canny/Depth dev (64 more) the control
    picture's latent (InstructPixToPixConditioning), as ComfyUI's Flux model builds them."""
    c = next((c for c in conds if c.extra.get("concat_latent_image") is not None), None)
    if c is None:
        raise BadRequest("this FLUX model reads a picture beside its latent: FLUX Fill takes InpaintModelConditioning,"
                         " FLUX Canny/Depth dev InstructPixToPixConditioning")
    latent = c.extra["concat_latent_image"].float()
    n, channels, lh, lw = samples.shape
    if latent.shape[-2:] != (lh, lw):
        raise BadRequest("the conditioning's picture and the sampled latent differ in size")
    parts = [latent]
    if features == channels * 4 + vae_sf * vae_sf * 4:  # FLUX Fill: the mask too
        if c.extra.get("concat_mask") is None:
            raise BadRequest("a FLUX Fill model needs the mask: use InpaintModelConditioning")
        mask = c.extra["concat_mask"].float().reshape(-1, 1, *c.extra["concat_mask"].shape[-2:])
        mask = torch.nn.functional.interpolate(mask, size=(lh * vae_sf, lw * vae_sf), mode="bilinear")
        parts.append(mask.view(mask.shape[0], lh, vae_sf, lw, vae_sf).permute(0, 2, 4, 1, 3).reshape(
            mask.shape[0], vae_sf * vae_sf, lh, lw))
    elif features != channels * 4:
        raise BadRequest(f"a FLUX model reading {features} more features a token is not one imagesmith knows")
    out = torch.cat(parts, dim=1)
    return out.repeat(n // out.shape[0], 1, 1, 1) if out.shape[0] != n else out


def schedule_sampling(ctx, model: ModelValue):
    """The model's sampling for the schedule nodes, which know no image size (1024x1024: FLUX's default shift)."""
    entry = ctx.engine.pipeline(model.entry)
    with entry.use():
        return model_sampling_for(ctx.engine, entry.value, model, 1024, 1024)


def custom_sigmas(ctx, model: ModelValue, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """BasicScheduler: ``steps`` sigmas of the model's schedule (of int(steps / denoise) when denoise < 1, the last
    steps + 1 of them), no sampler-specific trimming (that is KSampler's). A schedule knows no image size: a FLUX
    model without ModelSamplingFlux takes the shift of 1024x1024, which is ComfyUI's default (mu 1.15)."""
    from ..sampling.schedules import make_sigmas
    if denoise <= 0:
        return torch.zeros(0)
    ms = schedule_sampling(ctx, model)
    _, schedule = resolve_sampling("euler", scheduler, flow=ms.is_flow)
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    family = "sdxl" if model.entry.arch == "sdxl" else "sd1"
    return make_sigmas(schedule, ms, total, family=family)[-(steps + 1):].float()


def _family(arch: str) -> str:
    return {"house": "sd1"}.get(arch, arch)


def _latent_channels(pipe, arch: str) -> int:
    if arch == "flux":  # FLUX Fill reads more features than it writes: its latent is its output's
        cfg = pipe.transformer.config
        return (cfg.out_channels or cfg.in_channels) // 4
    net = getattr(pipe, "unet", None) or pipe.transformer
    return getattr(net.config, "out_channels", None) or net.config.in_channels


def _plain(conds: list[Cond]) -> bool:
    return len(conds) == 1 and not ({"area", "mask", "controls"} & set(conds[0].extra))


def _conditioning(c: Cond, n: int, width: int, height: int) -> Conditioning:
    added = None
    if c.arch == "sdxl":
        if c.pooled is None:
            raise UnsupportedModel("SDXL conditioning needs the pooled embedding of its second text encoder")
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1)
        added = {"text_embeds": c.pooled.repeat(n, 1), "time_ids": ids}
    return Conditioning(c.embeds.repeat(n, 1, 1), added)


def build_denoiser(engine, pipe, net, arch: str, ms, positive: list[Cond], negative: list[Cond], cfg: float,
                   n: int, width: int, height: int, *, concat: torch.Tensor | None = None):
    if concat is not None and any({"area", "set_area_to_bounds"} & set(c.extra) for c in positive + negative):
        raise BadRequest("conditioning areas with an inpainting model (9-channel UNet) are not supported yet")
    if arch in UNET_ARCHS:
        if _plain(positive) and _plain(negative) and positive[0].embeds.shape == negative[0].embeds.shape:
            cond = _conditioning(positive[0], n, width, height)
            uncond = _conditioning(negative[0], n, width, height)
            return UNetDenoiser(net, ms, cond, uncond if cfg != 1 else None, cfg, concat=concat)

        def one(c: Cond):
            return UNetDenoiser(net, ms, _conditioning(c, n, width, height), None, 1.0,
                                control=_controls(engine, c, ms, n, width, height), concat=concat)
    elif arch == "sd3":
        def one(c: Cond):
            return SD3Denoiser(net, ms, Conditioning(c.embeds.repeat(n, 1, 1), {"pooled": c.pooled.repeat(n, 1)}),
                               None, 1.0, control=_dit_controls(engine, pipe, c, ms, n, width, height, "sd3",
                                                                lambda t: t))
    elif arch == "qwen":
        from .. import qwen_image as Q
        vae_sf = pipe.vae_scale_factor
        # a latent with an odd side (VAEEncode of a picture 8 px, not 16 px, aligned) is padded to whole 2x2
        # patches, circularly as ComfyUI's Qwen model does, and cropped back after each call
        lh, lw = height // vae_sf, width // vae_sf
        ph, pw = lh % 2, lw % 2
        height, width = (lh + ph) * vae_sf, (lw + pw) * vae_sf
        shape = (1, height // vae_sf // 2, width // vae_sf // 2)

        def one(c: Cond):
            inner = _qwen_one(c)
            return inner if not (ph or pw) else PaddedToPatches(inner, ph, pw)

        def _qwen_one(c: Cond):
            added = {} if c.extra.get("text_mask") is None else {"mask": c.extra["text_mask"].repeat(n, 1)}
            refs = c.extra.get("reference_latents") or []
            context = None
            if refs:  # Qwen-Image-Edit: each picture's latent as tokens after the output's, on their own frames
                context = (torch.cat([Q.pack(pipe, r).repeat(n, 1, 1) for r in refs], dim=1),
                           [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs])
            return QwenDenoiser(net, ms, Conditioning(c.embeds.repeat(n, 1, 1), added), None, 1.0,
                                pack=lambda x: Q.pack(pipe, x), unpack=lambda y: Q.unpack(pipe, y, width, height),
                                shape=shape, context=context,
                                control=_dit_controls(engine, pipe, c, ms, n, width, height, "qwen",
                                                      lambda x: Q.pack(pipe, x)))
    elif arch == "flux":
        vae_sf = pipe.vae_scale_factor
        h, w = height // vae_sf, width // vae_sf
        img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, engine.device, engine.dtype)

        def pack(x):
            return pipe._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])

        def one(c: Cond):
            guidance = c.extra.get("guidance", 3.5) if net.config.guidance_embeds else None
            return FluxDenoiser(net, ms, Conditioning(c.embeds.repeat(n, 1, 1), {
                "pooled": c.pooled.repeat(n, 1), "txt_ids": c.extra["txt_ids"]}), guidance,
                pack=pack, unpack=lambda y: pipe._unpack_latents(y, height, width, vae_sf), img_ids=img_ids,
                control=_dit_controls(engine, pipe, c, ms, n, width, height, "flux", pack),
                context=_kontext_references(pipe, c, n, pack), extra=None if concat is None else pack(concat),
                attn_bias=c.extra.get("attn_bias"))
    else:
        raise UnsupportedModel(f"KSampler cannot run {arch} models")
    pos = AreaMix([(one(c), c) for c in positive])
    neg = AreaMix([(one(c), c) for c in negative]) if cfg != 1 else None
    return Guided(pos, neg, cfg)


def _kontext_references(pipe, c: Cond, n: int, pack):
    """ReferenceLatent's pictures on FLUX (Kontext) as tokens after the output's, with positions on frame 1; a second
    and later picture placed beside or below the ones before (the side that keeps the whole smaller), as ComfyUI's
    default "offset" placement does. None without references."""
    refs = c.extra.get("reference_latents") or []
    if not refs:
        return None
    tokens, ids = [], []
    h_used = w_used = 0
    for r in refs:
        lh, lw = r.shape[-2] // 2 * 2, r.shape[-1] // 2 * 2
        r = r[..., :lh, :lw]
        h_off = w_off = 0
        if lh + h_used > lw + w_used:
            w_off = w_used
        else:
            h_off = h_used
        h_used, w_used = max(h_used, lh + h_off), max(w_used, lw + w_off)
        tokens.append(pack(r.float().repeat(n // r.shape[0] if n % r.shape[0] == 0 else 1, 1, 1, 1)[:n]))
        pos = torch.zeros(lh // 2, lw // 2, 3)
        pos[..., 0] = 1
        pos[..., 1] = torch.arange(lh // 2)[:, None] + h_off // 2
        pos[..., 2] = torch.arange(lw // 2)[None, :] + w_off // 2
        ids.append(pos.reshape(-1, 3))
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)


def _dit_controls(engine, pipe, c: Cond, ms, n: int, width: int, height: int, family: str,
                  pack) -> list[ControlSpec] | None:
    """FLUX, SD3 and Qwen-Image ControlNets of a conditioning entry (ControlNetApplyAdvanced with its ``vae``, as
    ComfyUI wires them): the control image at the output size, VAE-encoded (and for FLUX and Qwen-Image packed into
    the transformer's tokens), with its strength, window and, for a union model, its type (SetUnionControlNetType's
    name, mapped to the model's own index; InstantX's Qwen-Image union takes none)."""
    from ..controlnet import UNION_INDEX
    out = []
    for cn, image, strength, start, end, *rest in c.extra.get("controls", ()):
        model = engine.component("controlnet", cn.name)
        kind = "qwen" if type(model).__name__.startswith("QwenImage") else (
            "flux" if hasattr(model.config, "axes_dims_rope") else (
                "sd3" if hasattr(model.config, "joint_attention_dim") else "sd"))
        if kind != family:
            raise BadRequest(f"ControlNet {cn.name} is a{'n SD' if kind == 'sd' else ' ' + kind.upper()} ControlNet; "
                             f"the model is {family.upper()}")
        from .. import qwen_image as Q
        mask = rest[1] if len(rest) > 1 else None  # ControlNetInpaintingAliMamaApply's
        inpainting = kind == "qwen" and getattr(model.config, "extra_condition_channels", 0)
        if inpainting and mask is None:
            raise BadRequest(f"ControlNet {cn.name} is a Qwen-Image inpainting ControlNet: apply it with "
                             "ControlNetInpaintingAliMamaApply, which gives it the mask")
        if kind == "qwen":
            Q.share_positions(model, pipe.transformer)
        vae = rest[0] if rest and rest[0] is not None else None
        vae = vae_module(engine, vae) if vae is not None else pipe.vae
        img = torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear").clamp(0, 1)
        if inpainting:  # other ControlNets take the picture alone, as ComfyUI's node gives it to them
            hole = torch.nn.functional.interpolate(mask, size=(height, width), mode="bilinear") >= 0.5
            latent = Q.inpaint_control(lambda x: engine.vae_encode(vae, x), img, hole)
        else:
            latent = engine.vae_encode(vae, img * 2 - 1)
        cond = pack(latent.repeat(n, 1, 1, 1))
        modes = getattr(model.config, "num_mode", None)
        mode = None
        if modes:
            if cn.union_type is None:
                raise BadRequest(f"{cn.name} is a union ControlNet: set its type with SetUnionControlNetType")
            named = next((k for k, v in UNION_INDEX["sdxl"].items() if v == cn.union_type), None)
            mode = UNION_INDEX.get(family, {}).get(named)
            if mode is None or mode >= modes:
                raise BadRequest(f"{cn.name}: union type {named} is not one it has")
            mode = torch.full((n, 1), mode, dtype=torch.long)
        out.append(ControlSpec(model, cond, strength, sigma_start=ms.percent_to_sigma(start),
                               sigma_end=ms.percent_to_sigma(end), mode=mode))
    return out or None


def _controls(engine, c: Cond, ms, n: int, width: int, height: int) -> list[ControlSpec] | None:
    out = []
    for cn, image, strength, start, end, *_ in c.extra.get("controls", ()):
        model = engine.component("controlnet", cn.name)
        img = torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear")
        kinds = getattr(model.config, "num_control_type", None)
        if kinds and cn.union_type is None:  # ComfyUI's "auto" has no equivalent in diffusers' union model
            raise BadRequest(f"{cn.name} is a union ControlNet: set its type with SetUnionControlNetType")
        if cn.union_type is not None and (not kinds or cn.union_type >= kinds):
            raise BadRequest(f"{cn.name}: union type {cn.union_type} is not one it has")
        out.append(ControlSpec(model, img.repeat(n, 1, 1, 1), strength, sigma_start=ms.percent_to_sigma(start),
                               sigma_end=ms.percent_to_sigma(end),
                               mode=None if cn.union_type is None else torch.tensor([[cn.union_type]])))
    return out or None


class PaddedToPatches:
    """A denoiser on a latent padded by (ph, pw) cells at the bottom and right (circularly), cropped back."""

    def __init__(self, denoise, ph: int, pw: int):
        self.denoise, self.ph, self.pw = denoise, ph, pw

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (0, self.pw, 0, self.ph), mode="circular")
        return self.denoise(padded, sigma)[..., :h, :w]


class AreaMix:
    """ComfyUI's combination of conditioning entries: each predicts on its area (a crop of the latent) with
    weight strength x mask; overlapping predictions are averaged."""

    def __init__(self, parts: list[tuple[object, Cond]]):
        self.parts = parts

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        count = torch.zeros_like(x[:, :1])
        for denoise, c in self.parts:
            h, w = x.shape[-2:]
            y0, x0, y1, x1 = 0, 0, h, w
            weight = torch.full_like(x[:, :1], float(c.extra.get("strength", 1.0)))
            area = c.extra.get("area")
            mask = c.extra.get("mask")
            if mask is not None:
                m = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=(h, w),
                                                    mode="bilinear").to(x)
                weight = weight * m[:1] * float(c.extra.get("mask_strength", 1.0))
                if c.extra.get("set_area_to_bounds"):
                    ys, xs = torch.nonzero(m[0, 0] > 0, as_tuple=True)
                    if len(ys):
                        y0, x0, y1, x1 = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
            if area is not None:
                ah, aw, ay, ax = area
                y0, x0 = min(ay, h - 1), min(ax, w - 1)
                y1, x1 = min(y0 + ah, h), min(x0 + aw, w)
            crop = x[:, :, y0:y1, x0:x1]
            out = denoise(crop, sigma)
            wgt = weight[:, :, y0:y1, x0:x1]
            total[:, :, y0:y1, x0:x1] += out * wgt
            count[:, :, y0:y1, x0:x1] += wgt
        covered = count > 0
        return torch.where(covered, total / count.clamp_min(1e-8), x)  # a cell no entry covers keeps x


class Guided:
    def __init__(self, pos, neg, cfg: float):
        self.pos, self.neg, self.cfg = pos, neg, float(cfg)
        self.last_uncond = None
        self.post_cfg: tuple = ()

    def __call__(self, x, sigma):
        cond = self.pos(x, sigma)
        if self.neg is None:
            return self._post(cond, cond)
        uncond = self.neg(x, sigma)
        self.last_uncond = uncond
        return self._post(cond, uncond + (cond - uncond) * self.cfg)

    def _post(self, cond, guided):
        if not self.post_cfg:
            return guided
        strength = self.post_cfg[1]  # ComfyUI's CFGNorm: scale each cell down to the conditional x0's norm
        scale = (torch.linalg.vector_norm(cond, dim=1, keepdim=True)
                 / (torch.linalg.vector_norm(guided, dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
        return guided * scale * strength
