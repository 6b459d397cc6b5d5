"""Denoisers over diffusers networks: x0 estimates with classifier-free guidance, for the samplers.

`UNetDenoiser` wraps an SD1/SD2/SDXL (or house) UNet: the model's own prediction type through ModelSampling,
the timestep as ComfyUI feeds it (the nearest entry of the model's table), CFG in x0 space (ComfyUI's), SDXL's
added conditioning, an optional ControlNet active over a sigma range, and the extra input channels of
inpainting UNets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_sampling import ModelSampling



def compute_dtype(module) -> torch.dtype:
    """The dtype a model computes in: diffusers' own answer (it skips quantised GGUF and bitsandbytes parameters,
    which are integers), else its first floating-point parameter's."""
    d = getattr(module, "dtype", None)
    if isinstance(d, torch.dtype) and d.is_floating_point:
        return d
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


@dataclass
class Conditioning:
    """One side of CFG for a whole batch: text embeddings [B, T, D], SDXL's added conditioning, and the
    IP-Adapter image embeddings (one tensor per adapter, batch first)."""
    embeds: torch.Tensor
    added: dict | None = None
    ip: list | None = None

    @staticmethod
    def cat(a: "Conditioning", b: "Conditioning") -> "Conditioning":
        added = None if a.added is None else {k: torch.cat([a.added[k], b.added[k]]) for k in a.added}
        ip = None if a.ip is None else [torch.cat([x, y]) for x, y in zip(a.ip, b.ip)]
        return Conditioning(torch.cat([a.embeds, b.embeds]), added, ip)

    def to(self, device, dtype) -> "Conditioning":
        added = None if self.added is None else {k: v.to(device, dtype) for k, v in self.added.items()}
        ip = None if self.ip is None else [v.to(device, dtype) for v in self.ip]
        return Conditioning(self.embeds.to(device, dtype), added, ip)


@dataclass
class IPWindow:
    """An IP-Adapter's weight, active while sigma_end <= sigma <= sigma_start (0 outside)."""
    weight: float
    sigma_start: float = float("inf")
    sigma_end: float = 0.0


@dataclass
class ControlSpec:
    model: torch.nn.Module
    image: torch.Tensor
    """[B, 3, H, W] in [0, 1], one per image of the batch"""
    scale: float = 1.0
    sigma_start: float = float("inf")
    """active while sigma_end <= sigma <= sigma_start"""
    sigma_end: float = 0.0
    mode: torch.Tensor | None = None
    """a union ControlNet's control type, [B, 1] (FLUX, SDXL Union)"""
    soft: bool = False
    """A1111's 'My prompt is more important': residual i of the UNet's (down blocks in order, then the middle)
    scaled by 0.825 ** (12 - i), so the deep layers keep the control and the outer ones the prompt"""
    cond_only: bool = False
    """A1111's 'ControlNet is more important': the residuals reach the prompt's half of CFG only"""


SOFT_DECAY = 0.825  # sd-webui-controlnet's soft injection: 13 residuals of an SD1 UNet, 0.825 ** (12 - i)


def soft_scales(count: int) -> list[float]:
    """The soft-injection factor of each of ``count`` residuals (down blocks, then the middle), as the extension
    zips its 13 factors with the residuals it has (an SDXL UNet's 10 take the first 10)."""
    return [SOFT_DECAY ** float(12 - i) for i in range(min(count, 13))] + [1.0] * max(0, count - 13)


class UNetDenoiser:
    def __init__(self, unet, ms: ModelSampling, cond: Conditioning, uncond: Conditioning | None, cfg_scale: float,
                 *, control: ControlSpec | list[ControlSpec] | None = None, concat: torch.Tensor | None = None,
                 cfg_rescale: float = 0.0, ip_windows: list[IPWindow] | None = None,
                 ip_masks: list | None = None):
        self.dtype = compute_dtype(unet)
        self.device = next(unet.parameters()).device
        self.unet, self.ms, self.cfg = unet, ms, float(cfg_scale)
        # moved to the network's device and dtype once, not at every step
        self.cond = cond.to(self.device, self.dtype)
        self.uncond = None if uncond is None else uncond.to(self.device, self.dtype)
        self.both = Conditioning.cat(self.uncond, self.cond) if self.uncond is not None else None
        self.cfg_rescale = float(cfg_rescale)
        # ControlNet units: each one's residuals are added while sigma is inside its window (A1111's multi-unit sum)
        self.controls = [] if control is None else list(control) if isinstance(control, list) else [control]
        self.control_images = [c.image.to(self.device, self.dtype) for c in self.controls]
        self.concat = concat  # inpainting UNets: [mask, masked-image latents] per image
        self.ip_windows = ip_windows or []
        self.ip_masks = ip_masks  # per adapter: [1, 1, H, W] in 0..1 (where it applies), or None (everywhere)
        self._ip_scales: list[float] | None = None
        self.last_uncond: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        guided = self.uncond is not None and self.cfg != 1.0
        n = x.shape[0]
        xin = self.ms.model_input(sigma, x)
        if self.concat is not None:
            xin = torch.cat([xin, self.concat.to(xin)], dim=1)
        t = self.ms.timestep_for_network(sigma)
        cond = self.both if guided else self.cond
        if guided:
            xin, t = torch.cat([xin, xin]), torch.cat([t, t])
        out = self._net(xin.to(self.device, self.dtype), t.to(self.device), cond, sigma[0]).float().to(x.device)
        if guided:
            s2 = torch.cat([sigma, sigma])
            both = self.ms.denoised(s2, out, torch.cat([x, x]))
            uncond, cond_x0 = both[:n], both[n:]
            self.last_uncond = uncond
            if self.cfg_rescale > 0:
                return rescaled_cfg(x, sigma, cond_x0, uncond, self.cfg, self.cfg_rescale)
            return uncond + (cond_x0 - uncond) * self.cfg
        self.last_uncond = None
        return self.ms.denoised(sigma, out, x)

    def guided_with(self, x: torch.Tensor, sigma: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor | None:
        """The guided estimate with the unconditional x0 another part of the same step already computed (the same
        negative, network and inputs): one network pass instead of two. None where that does not hold (no CFG,
        CFG rescale): the caller makes the full call."""
        if self.uncond is None or self.cfg == 1.0 or self.cfg_rescale > 0 or uncond is None:
            return None
        self.calls += 1
        xin = self.ms.model_input(sigma, x)
        if self.concat is not None:
            xin = torch.cat([xin, self.concat.to(xin)], dim=1)
        t = self.ms.timestep_for_network(sigma)
        out = self._net(xin.to(self.device, self.dtype), t.to(self.device), self.cond, sigma[0]).float().to(x.device)
        self.last_uncond = uncond
        return uncond + (self.ms.denoised(sigma, out, x) - uncond) * self.cfg

    def _net(self, xin, t, cond: Conditioning, sigma) -> torch.Tensor:
        kwargs = {"encoder_hidden_states": cond.embeds.to(self.device, self.dtype)}
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = {k: v.to(self.device, self.dtype) for k, v in cond.added.items()}
        unet_extra = {}
        if cond.ip is not None:  # IP-Adapters: their embeddings, and their weights for this step's sigma
            from ..ip_adapter import set_scales
            scales = [w.weight if w.sigma_end <= float(sigma) <= w.sigma_start else 0.0 for w in self.ip_windows]
            if scales != self._ip_scales:
                set_scales(self.unet, scales)
                self._ip_scales = scales
            unet_extra = {"added_cond_kwargs": {**kwargs.get("added_cond_kwargs", {}), "image_embeds": cond.ip}}
            if self.ip_masks is not None:
                unet_extra["cross_attention_kwargs"] = {"ip_adapter_masks": [
                    None if m is None else m.to(self.device, self.dtype) for m in self.ip_masks]}
        down_sum = mid_sum = None
        for c, image in zip(self.controls, self.control_images):
            if not (c.sigma_end <= float(sigma) <= c.sigma_start) or c.scale == 0:
                continue
            if image.shape[0] != xin.shape[0]:
                image = image.repeat(xin.shape[0] // image.shape[0], 1, 1, 1)
            sample = xin[:, :4] if xin.shape[1] > 4 else xin
            if c.mode is not None:  # a union ControlNet (SDXL Union/ProMax): one image, its control type one-hot
                kinds = torch.zeros(xin.shape[0], c.model.config.num_control_type, device=self.device,
                                    dtype=self.dtype)
                kinds[:, int(c.mode.flatten()[0])] = 1
                down, mid = c.model(sample, t, controlnet_cond=[image], control_type=kinds,
                                    control_type_idx=[int(c.mode.flatten()[0])], conditioning_scale=c.scale,
                                    return_dict=False, **kwargs)
            else:
                down, mid = c.model(sample, t, controlnet_cond=image, conditioning_scale=c.scale, return_dict=False,
                                    **kwargs)
            if c.soft or c.cond_only:
                down, mid = _shaped(list(down), mid, c, xin.shape[0] // 2 if cond is self.both else 0)
            if down_sum is None:
                down_sum, mid_sum = list(down), mid
            else:
                down_sum = [a + b for a, b in zip(down_sum, down)]
                mid_sum = mid_sum + mid
        if down_sum is not None:
            kwargs = {**kwargs, "down_block_additional_residuals": down_sum, "mid_block_additional_residual": mid_sum}
        return self.unet(xin, t, return_dict=False, **{**kwargs, **unet_extra})[0]


def _shaped(down: list[torch.Tensor], mid: torch.Tensor, c: ControlSpec, uncond_rows: int):
    """A unit's residuals under A1111's control modes: the soft-injection factors, and with ``cond_only`` the
    ``uncond_rows`` (the first rows of a CFG batch) zeroed."""
    if c.soft:
        scales = soft_scales(len(down) + 1)
        down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
    if c.cond_only and uncond_rows:
        keep = torch.ones(mid.shape[0], 1, 1, 1, device=mid.device, dtype=mid.dtype)
        keep[:uncond_rows] = 0
        down, mid = [d * keep for d in down], mid * keep
    return down, mid


def rescaled_cfg(x, sigma, cond_x0, uncond_x0, scale: float, phi: float) -> torch.Tensor:
    """CFG with the rescale of Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed",
    section 3.4; A1111's CFG Rescale, ComfyUI's RescaleCFG): guide in v space, then pull the guided v's standard
    deviation back toward the conditional one's by `phi`, which stops high CFG from burning v-prediction
    models' colours. x0 estimates in, x0 estimate out."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    root = (s ** 2 + 1.0) ** 0.5
    xs = x / (s ** 2 + 1.0)
    v_c = (xs - cond_x0) * root / s
    v_u = (xs - uncond_x0) * root / s
    v_cfg = v_u + scale * (v_c - v_u)
    dims = tuple(range(1, x.ndim))
    v_rescaled = v_cfg * (v_c.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    v = phi * v_rescaled + (1.0 - phi) * v_cfg
    return xs - v * s / root


class SD3Denoiser:
    """SD3's MMDiT: predicts the flow velocity (noise - x0) at timestep 1000 sigma; CFG in x0 space.
    `cond.added` holds {"pooled": [B, P]}."""

    def __init__(self, transformer, ms: ModelSampling, cond: Conditioning, uncond: Conditioning | None,
                 cfg_scale: float, *, control: list[ControlSpec] | None = None):
        self.net, self.ms, self.cond, self.uncond, self.cfg = transformer, ms, cond, uncond, float(cfg_scale)
        self.dtype = compute_dtype(transformer)
        self.device = next(transformer.parameters()).device
        self.last_uncond = None
        self.control = control or []

    def __call__(self, x, sigma):
        guided = self.uncond is not None and self.cfg != 1.0
        n = x.shape[0]
        cond = Conditioning.cat(self.uncond, self.cond) if guided else self.cond
        xin, s = (torch.cat([x, x]), torch.cat([sigma, sigma])) if guided else (x, sigma)
        common = dict(hidden_states=xin.to(self.device, self.dtype), timestep=self.ms.timestep(s).to(self.device),
                      encoder_hidden_states=cond.embeds.to(self.device, self.dtype),
                      pooled_projections=cond.added["pooled"].to(self.device, self.dtype), return_dict=False)
        blocks = None
        at = float(sigma.flatten()[0])
        for c in self.control:  # SD3 ControlNets: residuals per transformer block, summed over units
            if c.scale == 0 or not (c.sigma_end <= at * (1 + 1e-6) and at <= c.sigma_start * (1 + 1e-6)):
                continue
            image = c.image.to(self.device, self.dtype)
            image = image.repeat(xin.shape[0] // image.shape[0], 1, 1, 1) if image.shape[0] != xin.shape[0] else image
            got = c.model(controlnet_cond=image, conditioning_scale=c.scale, **common)[0]
            blocks = list(got) if blocks is None else [a + b for a, b in zip(blocks, got)]
        out = self.net(block_controlnet_hidden_states=blocks, **common)[0].float().to(x.device)
        both = self.ms.denoised(s, out, xin)
        if guided:
            self.last_uncond = both[:n]
            return both[:n] + (both[n:] - both[:n]) * self.cfg
        self.last_uncond = None
        return both


class FluxDenoiser:
    """FLUX's transformer on 2x2-packed latents: the samplers see the plain [B, C, H, W] latent; guidance is
    the distilled guidance embedding (FLUX dev), not CFG. `cond.added` holds {"pooled", "txt_ids"}.

    ``extra``: packed tokens' features appended to each latent token (FLUX Fill: the masked picture's latent and
    the mask, 64 + 256 features). ``context``: (tokens, ids) of a reference picture appended to the sequence
    (FLUX Kontext: its ids' first axis is 1); the network's answer for them is dropped."""

    def __init__(self, transformer, ms: ModelSampling, cond: Conditioning, guidance: float | None, pack, unpack,
                 img_ids: torch.Tensor, *, extra: torch.Tensor | None = None,
                 context: tuple[torch.Tensor, torch.Tensor] | None = None,
                 extra_text: list[tuple[torch.Tensor, float, float]] | None = None,
                 control: list[ControlSpec] | None = None, attn_bias: torch.Tensor | None = None):
        self.net, self.ms, self.cond, self.guidance = transformer, ms, cond, guidance
        self.pack, self.unpack, self.img_ids = pack, unpack, img_ids
        self.extra, self.context, self.extra_text = extra, context, extra_text or []
        self.attn_bias = attn_bias
        self.control = control or []
        self.dtype = compute_dtype(transformer)
        self.device = next(transformer.parameters()).device
        self.last_uncond = None

    @staticmethod
    def pack_width(x) -> int:
        """Features of a packed latent token (2x2 patches of its channels)."""
        return x.shape[1] * 4

    def __call__(self, x, sigma):
        n = x.shape[0]
        packed = self.pack(x).to(self.device, self.dtype)
        tokens, ids = packed.shape[1], self.img_ids
        if self.extra is not None:
            packed = torch.cat([packed, self.extra.to(self.device, self.dtype)], dim=2)
        if self.context is not None:
            ref, ref_ids = self.context
            packed = torch.cat([packed, ref.to(self.device, self.dtype)], dim=1)
            ids = torch.cat([ids, ref_ids.to(ids.device, ids.dtype)], dim=0)
        g = None
        if self.guidance is not None:
            g = torch.full((n,), float(self.guidance), device=self.device, dtype=torch.float32)
        text, txt_ids = self.cond.embeds, self.cond.added["txt_ids"]
        s = float(sigma.flatten()[0])
        active = [t for t, start, end in self.extra_text if end <= s * (1 + 1e-6) and s <= start * (1 + 1e-6)]
        if active:  # FLUX Redux: reference tokens after the prompt's, at text position 0 as diffusers' and ComfyUI's
            text = torch.cat([text] + [t.to(text.device, text.dtype) for t in active], dim=1)
            txt_ids = torch.zeros(text.shape[1], txt_ids.shape[-1], dtype=txt_ids.dtype, device=txt_ids.device)
        timestep = self.ms.timestep(sigma).to(self.device, self.dtype)
        common = dict(timestep=timestep, pooled_projections=self.cond.added["pooled"].to(self.device, self.dtype),
                      encoder_hidden_states=text.to(self.device, self.dtype), txt_ids=txt_ids.to(self.device))
        blocks = singles = None
        for c in self.control:  # FLUX ControlNets: their residuals summed, as diffusers' multi-ControlNet
            if c.scale == 0 or not (c.sigma_end <= s * (1 + 1e-6) and s <= c.sigma_start * (1 + 1e-6)):
                continue
            cg = g if getattr(c.model.config, "guidance_embeds", False) else None
            b, sb = c.model(hidden_states=packed[:, :tokens, :self.pack_width(x)], controlnet_cond=c.image.to(
                self.device, self.dtype), controlnet_mode=None if c.mode is None else c.mode.to(self.device),
                conditioning_scale=c.scale, img_ids=self.img_ids.to(self.device), guidance=cg, return_dict=False,
                **common)
            blocks = b if blocks is None else [p + q for p, q in zip(blocks, b)]
            singles = sb if singles is None else [p + q for p, q in zip(singles, sb)] if sb is not None else singles
        joint = None
        if self.attn_bias is not None:  # ComfyUI's StyleModelApply attn_bias: its text x (text + 1) mask, the one
            joint = {"attention_mask": self._full_mask(text.shape[1], packed.shape[1])}  # image place for all
        out = self.net(hidden_states=packed, guidance=g, img_ids=ids.to(self.device), return_dict=False,
                       controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                       joint_attention_kwargs=joint, **common)[0]
        v = self.unpack(out[:, :tokens].float()).to(x.device)
        return self.ms.denoised(sigma, v, x)


    def _full_mask(self, n_text: int, n_image: int) -> torch.Tensor:
        """The attention mask over the joint sequence (text, then image tokens) from the [T + 1, T + 1] one whose
        last row and column stand for every image token, as ComfyUI widens its mask to the image's tokens."""
        small = self.attn_bias
        if small.shape[0] != n_text + 1:
            from ...core.errors import BadRequest
            raise BadRequest(f"a Redux attention bias covers {small.shape[0] - 1} text tokens, the conditioning has "
                             f"{n_text} (a node changed the tokens after StyleModelApply)")
        t = n_text
        full = torch.empty(t + n_image, t + n_image)
        full[:t, :t], full[:t, t:] = small[:t, :t], small[:t, t:]
        full[t:, :t], full[t:, t:] = small[t:, :t], small[t:, t:]
        return full.to(self.device, self.dtype)[None, None]


class QwenDenoiser:
    """Qwen-Image's MMDiT on 2x2-packed latents. It predicts the flow velocity; guidance is "true CFG" (two
    passes, cond and uncond, each with its own text length and padding mask) followed by diffusers' rescale of the
    guided velocity to the conditional one's norm, token by token (QwenImagePipeline's). `cond.added["mask"]` is
    the text padding mask [B, T] or None.

    ``context``: Qwen-Image-Edit's picture to edit, as packed latent tokens appended to the sequence, with their
    (frames, rows, cols) shapes for the transformer's 3-D positions; the network's answer for them is dropped.

    ``control``: Qwen-Image ControlNets (InstantX's): their per-block residuals, computed with the positive prompt
    and summed over units, go into both passes, as diffusers' QwenImageControlNetPipeline does."""

    def __init__(self, transformer, ms: ModelSampling, cond: Conditioning, uncond: Conditioning | None,
                 cfg_scale: float, *, pack, unpack, shape: tuple[int, int, int],
                 context: tuple[torch.Tensor, list[tuple[int, int, int]]] | None = None,
                 control: list[ControlSpec] | None = None):
        self.net, self.ms, self.cfg = transformer, ms, float(cfg_scale)
        self.dtype = compute_dtype(transformer)
        self.device = next(transformer.parameters()).device
        self.cond = cond.to(self.device, self.dtype)
        self.uncond = None if uncond is None else uncond.to(self.device, self.dtype)
        self.pack, self.unpack, self.shape, self.context = pack, unpack, shape, context
        self.control = control or []
        self.last_uncond = None

    def _velocity(self, packed, t, cond: Conditioning, shapes, tokens: int, blocks=None) -> torch.Tensor:
        mask = (cond.added or {}).get("mask")
        out = self.net(hidden_states=packed, encoder_hidden_states=cond.embeds,
                       encoder_hidden_states_mask=None if mask is None else mask.to(self.device),
                       timestep=t, img_shapes=shapes, controlnet_block_samples=blocks, return_dict=False)[0]
        return out[:, :tokens].float()

    def _control(self, packed, t, sigma, shapes):
        """The active units' residuals for this step, summed (None without any)."""
        blocks = None
        at = float(sigma.flatten()[0])
        mask = (self.cond.added or {}).get("mask")
        for c in self.control:
            if c.scale == 0 or not (c.sigma_end <= at * (1 + 1e-6) and at <= c.sigma_start * (1 + 1e-6)):
                continue
            got = c.model(hidden_states=packed, controlnet_cond=c.image.to(self.device, self.dtype),
                          conditioning_scale=c.scale, timestep=t, encoder_hidden_states=self.cond.embeds,
                          encoder_hidden_states_mask=None if mask is None else mask.to(self.device),
                          img_shapes=shapes, return_dict=False)
            blocks = list(got) if blocks is None else [a + b for a, b in zip(blocks, got)]
        return blocks

    def __call__(self, x, sigma):
        n = x.shape[0]
        packed = self.pack(x).to(self.device, self.dtype)
        tokens = packed.shape[1]
        shapes = [[self.shape]] * n
        if self.context is not None:
            ref, ref_shapes = self.context
            packed = torch.cat([packed, ref.to(self.device, self.dtype)], dim=1)
            shapes = [[self.shape, *ref_shapes]] * n
        t = self.ms.timestep(sigma).to(self.device, self.dtype).expand(n)
        blocks = self._control(packed, t, sigma, shapes) if self.control else None
        v = self._velocity(packed, t, self.cond, shapes, tokens, blocks)
        self.last_uncond = None
        if self.uncond is not None and self.cfg != 1.0:
            v_u = self._velocity(packed, t, self.uncond, shapes, tokens, blocks)
            guided = v_u + self.cfg * (v - v_u)
            v = guided * (torch.linalg.vector_norm(v, dim=-1, keepdim=True)
                          / torch.linalg.vector_norm(guided, dim=-1, keepdim=True))
            self.last_uncond = self.ms.denoised(sigma, self.unpack(v_u).to(x.device), x)
        return self.ms.denoised(sigma, self.unpack(v).to(x.device), x)


@dataclass
class Qwen21Text:
    """One request's Qwen-Image 2.1 conditioning (QwenImage21Pipeline.encode_prompt): the Qwen3-VL hidden states
    [1, T, D] with its condition pictures' slots among them, ``slots`` [1, T] (True where a picture's 2x2 latent
    group goes), and ``count``, the images it makes."""
    embeds: torch.Tensor
    slots: torch.Tensor
    count: int


class KVCachedQwen21:
    """Qwen-Image 2.1's transformer over a run: the text and condition-picture tokens are modulated at t = 0 and
    attend only to what precedes them (block-causal), so their keys and values are the same at every step. The
    first call computes them ("extract"), later calls reuse them ("cached") and run only the target's tokens, as
    diffusers' QwenImage21Pipeline does. One cache per conditioning; a request's rows run together, each request
    apart (a padded text would move the target's rotary positions, so a picture would depend on its batch-mates).

    ``pictures``: the condition pictures' latent tokens [1, N, C] and (frames, rows, cols) shapes, before the
    target's."""

    def __init__(self, transformer, texts: list[Qwen21Text], shape: tuple[int, int, int],
                 pictures: tuple[torch.Tensor, list[tuple[int, int, int]]] | None, device, dtype):
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
        self.net, self.shape, self.pictures = transformer, shape, pictures
        self.device, self.dtype = device, dtype
        cached = bool(transformer.config.causal_condition)
        self.texts = [Qwen21Text(t.embeds.to(device, dtype), t.slots.to(device).bool(), t.count) for t in texts]
        self.caches = [QwenImage21KVCache(len(transformer.transformer_blocks)) if cached else None for _ in texts]
        self.filled = [False] * len(texts)
        self.calls = 0

    def __call__(self, packed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens = packed.shape[1]
        shapes = [(*(self.pictures[1] if self.pictures else []), self.shape)]
        out, lo = [], 0
        for i, text in enumerate(self.texts):
            rows = packed[lo:lo + text.count]
            n = rows.shape[0]
            if self.pictures is not None:
                rows = torch.cat([self.pictures[0].to(self.device, self.dtype).expand(n, -1, -1), rows], dim=1)
            slots = torch.cat([text.slots, text.slots.new_ones(1, tokens // 4)], dim=1).expand(n, -1)
            cache = self.caches[i]
            mode = None if cache is None else ("cached" if self.filled[i] else "extract")
            v = self.net(hidden_states=rows, encoder_hidden_states=text.embeds.expand(n, -1, -1), timestep=t[lo:lo + n],
                         img_shapes=shapes * n, img_mask=slots, kv_cache=cache, kv_cache_mode=mode,
                         return_dict=False)[0]
            self.filled[i] = cache is not None
            self.calls += 1
            out.append(v[:, -tokens:].float())
            lo += n
        return torch.cat(out)


class Qwen21Denoiser:
    """Qwen-Image 2.1's single-stream transformer on unpatched latents ([B, 64, H/16, W/16] -> one token a latent
    pixel; its picture slots take 2x2 groups). It predicts the flow velocity; guidance is true CFG, cond and
    uncond each with its own text and KV cache, without Qwen-Image's norm rescale (QwenImage21Pipeline's)."""

    def __init__(self, transformer, ms: ModelSampling, cond: list[Qwen21Text], uncond: list[Qwen21Text] | None,
                 cfg_scale: float, *, shape: tuple[int, int, int],
                 pictures: tuple[torch.Tensor, list[tuple[int, int, int]]] | None = None):
        self.ms, self.cfg = ms, float(cfg_scale)
        self.net = transformer
        self.dtype = compute_dtype(transformer)
        self.device = next(transformer.parameters()).device
        self.cond = KVCachedQwen21(transformer, cond, shape, pictures, self.device, self.dtype)
        self.uncond = None if uncond is None else KVCachedQwen21(transformer, uncond, shape, pictures, self.device,
                                                                  self.dtype)
        self.last_uncond = None

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).transpose(1, 2)

    def __call__(self, x, sigma):
        n, c, h, w = x.shape
        packed = self.pack(x).to(self.device, self.dtype)
        t = self.ms.timestep(sigma).to(self.device, self.dtype).expand(n)
        unpack = lambda v: v.transpose(1, 2).reshape(n, c, h, w).to(x.device)  # noqa: E731
        v = self.cond(packed, t)
        self.last_uncond = None
        if self.uncond is not None and self.cfg != 1.0:
            v_u = self.uncond(packed, t)
            v = v_u + self.cfg * (v - v_u)
            self.last_uncond = self.ms.denoised(sigma, unpack(v_u), x)
        return self.ms.denoised(sigma, unpack(v), x)


class StepScheduled:
    """Conditioning that changes with the sampling step (A1111's prompt editing and alternation): `parts` are
    (last step, 1-based; denoiser). A call's step is its sigma's place in `sigmas`, so a sampler's extra
    evaluations inside a step (Heun, DPM2) count as that step."""

    def __init__(self, parts: list, sigmas: torch.Tensor):
        self.parts = parts
        self.edges = [float(x) for x in sigmas[:-1]]
        self.last_uncond = None

    def step_of(self, sigma: torch.Tensor) -> int:
        s = float(sigma.flatten()[0])
        return max(1, sum(1 for e in self.edges if e >= s * (1 - 1e-6)))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        step = self.step_of(sigma)
        denoise = next((d for end, d in self.parts if step <= end), self.parts[-1][1])
        out = denoise(x, sigma)
        self.last_uncond = getattr(denoise, "last_uncond", None)
        return out


def shared_uncond_call(denoise, x: torch.Tensor, sigma: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
    """``denoise(x, sigma)``, reusing ``uncond`` (an earlier part's unconditional estimate of this step) where the
    denoiser can: AND parts and regions share their negative prompt, so A1111's one unconditional pass serves all."""
    reuse = getattr(denoise, "guided_with", None)
    out = reuse(x, sigma, uncond) if reuse is not None and uncond is not None else None
    return denoise(x, sigma) if out is None else out


class Composed:
    """A1111's AND (composable diffusion, Liu et al. 2022): ``parts`` are (weight, denoiser) with the same
    negative conditioning and CFG scale; the estimate is ``u + sum(w * (d_i - u))``, i.e.
    ``u + cfg * sum(w * (cond_i - u))``, the weights not normalised, as in A1111."""

    def __init__(self, parts: list):
        self.parts = parts
        self.last_uncond = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        total, uncond = None, None
        for weight, denoise in self.parts:
            d = shared_uncond_call(denoise, x, sigma, uncond)
            u = getattr(denoise, "last_uncond", None)
            if u is None:  # no CFG (scale 1): a weighted mean of the conditional estimates
                u = torch.zeros_like(d) if total is None else uncond
            uncond = u if uncond is None else uncond
            total = weight * (d - uncond) if total is None else total + weight * (d - uncond)
        self.last_uncond = uncond
        return uncond + total
