"""LoRA key naming: diffusers/peft <-> kohya/WebUI.

kohya (and so A1111, Forge and ComfyUI) name a LoRA'd module ``lora_unet_<module path with _>`` /
``lora_te[1|2]_<text encoder module path with _>`` and store ``.lora_down.weight`` (peft's ``lora_A``),
``.lora_up.weight`` (``lora_B``) and ``.alpha``. SD1.5 UNet paths are the diffusers ones; SDXL UNet paths
are the original (LDM) ones (``input_blocks_4_1_...``). :func:`to_kohya` writes that; :func:`from_kohya`
reads it back against the model's module names (underscores alone are ambiguous). FLUX and SD3 transformer
LoRAs: :func:`dit_to_kohya` (original BFL / MMDiT names, q/k/v fused; see the section below)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def _module_path(key: str) -> tuple[str, str]:
    """'a.b.lora_A.weight' -> ('a.b', 'lora_A')."""
    stem, _, _ = key.rpartition(".")
    module, _, ab = stem.rpartition(".")
    return module, ab


def _prefixes(components: Iterable[str]) -> dict[str, str]:
    prefixes = dict(PREFIXES)
    if "text_encoder_2" in components:
        prefixes["text_encoder"] = "lora_te1_"
    return prefixes


def to_kohya(layers: dict[str, dict[str, torch.Tensor]], *, alpha: float,
             unet_name_map: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """``{component: peft state}`` (keys ``<module>.lora_A.weight`` / ``lora_B``) -> kohya/WebUI keys with
    ``.alpha`` (scale = alpha / rank, as peft's ``lora_alpha``). ``unet_name_map`` maps UNet module paths
    (e.g. :func:`sdxl_unet_module_to_ldm` for SDXL)."""
    prefixes = _prefixes(layers)
    out: dict[str, torch.Tensor] = {}
    for comp, state in layers.items():
        for key, value in state.items():
            module, ab = _module_path(key)
            if comp == "unet" and unet_name_map is not None:
                module = unet_name_map(module)
            if comp.startswith("text_encoder") and not module.startswith("text_model.") and ".layers." in module:
                module = "text_model." + module  # CLIP: kohya names start at text_model
            name = prefixes[comp] + module.replace(".", "_")
            out[f"{name}.{'lora_down' if ab == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def from_kohya(state: dict[str, torch.Tensor], modules: dict[str, Iterable[str]], *,
               unet_name_map: Callable[[str], str] | None = None
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """The inverse of :func:`to_kohya`: ``modules`` = ``{component: its module names}`` (``named_modules``)
    to resolve the underscores. Returns ``({component: peft state}, {component: alpha})``."""
    prefixes = _prefixes(modules)
    lookup: dict[str, tuple[str, str]] = {}
    for comp, names in modules.items():
        for name in names:
            try:
                kohya = name if not (comp == "unet" and unet_name_map) else unet_name_map(name)
            except KeyError:  # a container module with no LDM name: never a LoRA target
                continue
            if comp.startswith("text_encoder") and not kohya.startswith("text_model.") and ".layers." in kohya:
                kohya = "text_model." + kohya
            lookup[prefixes[comp] + kohya.replace(".", "_")] = (comp, name)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in state.items():
        stem, _, kind = key.partition(".")
        if stem not in lookup:
            raise KeyError(f"kohya key {key!r} names no module of this model")
        comp, module = lookup[stem]
        if kind == "alpha":
            alphas[comp] = float(value)
        elif kind in ("lora_down.weight", "lora_up.weight"):
            ab = "lora_A" if kind.startswith("lora_down") else "lora_B"
            layers.setdefault(comp, {})[f"{module}.{ab}.weight"] = value
    return layers, alphas


def sdxl_unet_module_to_ldm(unet_config) -> Callable[[str], str]:
    """kohya's SDXL LoRAs name UNet modules in the original (LDM) layout: input_blocks_4_1_..."""
    from .convert import unet_prefix_map
    prefixes = sorted(unet_prefix_map(unet_config), key=lambda p: -len(p[0]))

    def convert(module: str) -> str:
        for src, dst, _ in prefixes:
            if (module + ".").startswith(src):
                return (dst + (module + ".")[len(src):]).rstrip(".")
        raise KeyError(module)
    return convert


# ------------------------------------------------------------------------------------ FLUX and SD3
# kohya/sd-scripts name a DiT LoRA after the original checkpoint's modules: FLUX in Black Forest Labs' layout
# (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``), SD3 in Stability's MMDiT
# layout (``lora_unet_joint_blocks_0_x_block_attn_qkv``), the same names ComfyUI and Forge key LoRAs by. Those
# layouts fuse what diffusers keeps apart (q, k and v; FLUX single blocks' q, k, v and MLP-in), so LoRAs on the
# separate diffusers modules become one LoRA on the fused module: ``lora_down`` = the members' A matrices
# stacked, ``lora_up`` = their B matrices block-diagonal (zero blocks for members without a LoRA), alpha times the
# number of members so alpha / rank stays each member's scale. The product is exactly the fused weight's update
# (sd-scripts' ``split_qkv`` layout; diffusers' kohya-FLUX reader splits it back). The inverse of models/convert.py's
# flux_to_bfl / sd3_to_mmdit, applied to LoRA deltas.
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

_FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
_FLUX_DOUBLE = {  # member modules (relative to transformer_blocks.N) -> BFL module (relative to double_blocks.N)
    QKV: "img_attn.qkv", ADDED_QKV: "txt_attn.qkv", ("attn.to_out.0",): "img_attn.proj",
    ("attn.to_add_out",): "txt_attn.proj", ("ff.net.0.proj",): "img_mlp.0", ("ff.net.2",): "img_mlp.2",
    ("ff_context.net.0.proj",): "txt_mlp.0", ("ff_context.net.2",): "txt_mlp.2",
    ("norm1.linear",): "img_mod.lin", ("norm1_context.linear",): "txt_mod.lin",
}
_FLUX_SINGLE = {(*QKV, "proj_mlp"): "linear1", ("proj_out",): "linear2", ("norm.linear",): "modulation.lin"}
_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
_SD3_JOINT = {  # relative to transformer_blocks.N -> relative to joint_blocks.N
    QKV: "x_block.attn.qkv", ADDED_QKV: "context_block.attn.qkv", ("attn.to_out.0",): "x_block.attn.proj",
    ("attn.to_add_out",): "context_block.attn.proj", ("norm1.linear",): "x_block.adaLN_modulation.1",
    ("norm1_context.linear",): "context_block.adaLN_modulation.1", ("ff.net.0.proj",): "x_block.mlp.fc1",
    ("ff.net.2",): "x_block.mlp.fc2", ("ff_context.net.0.proj",): "context_block.mlp.fc1",
    ("ff_context.net.2",): "context_block.mlp.fc2",
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv", ("attn2.to_out.0",): "x_block.attn2.proj",
}


class NoKohyaName(KeyError):
    """A LoRA'd module that the original (kohya) layout has no name for."""


def dit_kohya_name(arch: str, module: str, num_layers: int) -> tuple[str, tuple[str, ...], bool]:
    """A diffusers FLUX/SD3 transformer module -> (its kohya module in the original layout, the diffusers modules
    fused into that one, in order, whether the LoRA's output rows swap halves (diffusers' AdaLayerNormContinuous
    is (scale, shift), the original layout's (shift, scale)))."""
    if arch == "flux":
        top, blocks = _FLUX_TOP, (("transformer_blocks.", "double_blocks.", _FLUX_DOUBLE),
                                  ("single_transformer_blocks.", "single_blocks.", _FLUX_SINGLE))
    elif arch == "sd3":
        top, blocks = _SD3_TOP, (("transformer_blocks.", "joint_blocks.", _SD3_JOINT),)
    else:
        raise ValueError(f"no kohya DiT layout for {arch!r}")
    if module == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", (module,), True
    if module in top:
        return top[module], (module,), False
    for src, dst, table in blocks:
        if not module.startswith(src):
            continue
        index, _, rest = module[len(src):].partition(".")
        if not index.isdigit():
            continue
        for members, name in table.items():
            if rest in members:
                swap = arch == "sd3" and rest == "norm1_context.linear" and int(index) == num_layers - 1
                return f"{dst}{index}.{name}", tuple(f"{src}{index}.{m}" for m in members), swap
    raise NoKohyaName(module)


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def dit_to_kohya(arch: str, state: dict[str, torch.Tensor], *, alpha: float, num_layers: int,
                 out_features: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """A FLUX/SD3 transformer's peft LoRA state (``<module>.lora_A.weight`` / ``lora_B``, diffusers module names)
    -> kohya/WebUI keys in the original layout (see above). ``out_features`` gives the output width of fused-group
    members that carry no LoRA (their zero rows); raises :class:`NoKohyaName` for a module the layout cannot
    name, ValueError for members of one fused module with different ranks."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, ab = _module_path(key.removeprefix("transformer."))
        pairs.setdefault(module, {})[ab] = value
    groups: dict[str, tuple[tuple[str, ...], bool]] = {}
    for module in pairs:
        name, members, swap = dit_kohya_name(arch, module, num_layers)
        groups[name] = (members, swap)
    out: dict[str, torch.Tensor] = {}
    for name, (members, swap) in sorted(groups.items()):
        present = [m for m in members if m in pairs]
        ranks = {pairs[m]["lora_A"].shape[0] for m in present}
        if len(ranks) != 1:
            raise ValueError(f"{name}: the fused modules {present} have LoRAs of different ranks {sorted(ranks)}")
        r = ranks.pop()
        if len(members) == 1:
            down, up = pairs[members[0]]["lora_A"], pairs[members[0]]["lora_B"]
        else:
            a0 = pairs[present[0]]["lora_A"]
            rows = []
            for m in members:
                if m in pairs:
                    rows.append(pairs[m]["lora_B"].shape[0])
                elif out_features and m in out_features:
                    rows.append(int(out_features[m]))
                else:
                    raise NoKohyaName(f"{m} (its width is needed to fuse {name})")
            down = a0.new_zeros((len(members) * r, *a0.shape[1:]))
            up = a0.new_zeros((sum(rows), len(members) * r))
            offset = 0
            for j, (m, n) in enumerate(zip(members, rows)):
                if m in pairs:
                    down[j * r:(j + 1) * r] = pairs[m]["lora_A"]
                    up[offset:offset + n, j * r:(j + 1) * r] = pairs[m]["lora_B"].reshape(n, r)
                offset += n
        if swap:
            up = _swap_halves(up)
        stem = "lora_unet_" + name.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = down.contiguous()
        out[f"{stem}.lora_up.weight"] = up.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(alpha) * len(members))
    return out
