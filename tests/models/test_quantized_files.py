"""Quantised FLUX files as people download them: GGUF (Q8_0, Q4_0; written with llama.cpp's own gguf package,
loaded through diffusers' GGUF support), plain fp8 and ComfyUI's scaled fp8 single files, and bitsandbytes NF4
(Forge's format; written by bitsandbytes itself, dequantised by imagesmith without it). Each one identified by the probe, listed, and run through the
engine against the same weights in full precision."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imagesmith.core.requests import GenerateRequest
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.convert import META_CONFIGS, flux_to_bfl
from imagesmith.models.probe import probe

gguf = pytest.importorskip("gguf")

FP8_MAX = 448.0


def _flux_bfl(*, seed: int, std: float, single: int, head_dim: int, axes: tuple[int, int, int]):
    """(config, BFL-layout state) of a small FLUX transformer with random weights of ``std``."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=single,
                                   attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=axes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    return cfg, {k: v.contiguous() for k, v in flux_to_bfl(model.state_dict(), cfg).items()}


@pytest.fixture(scope="module")
def quant_home(tiny_home, tmp_path_factory):
    """A home with the tiny FLUX folder (the companion: VAE, text encoders) and one FLUX transformer, wider than
    the tiny one so that most of its layers quantise (rows of 32), in every format."""
    root = tmp_path_factory.mktemp("quant")
    settings = Settings(home=root)
    settings.ensure_home()
    ckpt = settings.models_dir / "checkpoints"
    shutil.copytree(tiny_home.models_dir / "checkpoints" / "tiny-flux", ckpt / "tiny-flux")
    cfg, bfl = _flux_bfl(seed=7, std=0.08, single=2, head_dim=16, axes=(4, 6, 6))
    meta = {META_CONFIGS: json.dumps({"transformer": cfg})}
    save_file(bfl, str(ckpt / "wide-flux-f32.safetensors"), metadata=meta)
    # GGUF, as city96's converter makes them: 2-D weights quantised, the rest (norms, biases, odd rows) in F32
    from fixtures.tiny import write_gguf
    for qname in ("Q8_0", "Q4_0"):
        write_gguf(ckpt / f"wide-flux-{qname}.gguf", bfl, "flux", qname, meta)
    # fp8: plain (each weight cast), and ComfyUI's scaled (each 2-D weight divided by absmax/448, scale kept)
    plain = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in bfl.items()}
    save_file(plain, str(ckpt / "wide-flux-fp8.safetensors"), metadata=meta)
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in bfl.items():
        if v.ndim == 2:
            s = v.abs().max().clamp(min=1e-12) / FP8_MAX
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k.removesuffix(".weight") + ".scale_weight"] = s.reshape(1).float()
        else:
            scaled[k] = v
    save_file(scaled, str(ckpt / "wide-flux-fp8-scaled.safetensors"), metadata=meta)
    return settings


def _image(engine: Engine, name: str, extra: str = "") -> np.ndarray:
    req = GenerateRequest(prompt=f"a lighthouse at dusk {extra}".strip(), model=name, width=64, height=64, steps=3,
                          cfg_scale=1.0, seed=5)
    return np.asarray(engine.generate(req).images[0], np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)))


def test_probe_and_listing_name_the_format(quant_home):
    ckpt = quant_home.models_dir / "checkpoints"
    q8 = probe(ckpt / "wide-flux-Q8_0.gguf")
    assert (q8.kind, q8.arch) == ("checkpoint", "flux") and q8.notes[0] == "GGUF Q8_0"
    assert q8.components == ["transformer"]
    assert probe(ckpt / "wide-flux-Q4_0.gguf").notes[0] == "GGUF Q4_0"
    assert probe(ckpt / "wide-flux-fp8.safetensors").notes[0] == "fp8 e4m3fn: upcast on load"
    assert probe(ckpt / "wide-flux-fp8-scaled.safetensors").notes[0].startswith("fp8 e4m3fn scaled")
    engine = Engine(quant_home, device="cpu")
    names = {e.name: e for e in engine.registry.list("checkpoint")}
    assert {"wide-flux-Q8_0", "wide-flux-Q4_0", "wide-flux-fp8", "wide-flux-fp8-scaled"} <= set(names)
    assert names["wide-flux-Q8_0"].companion == ckpt / "tiny-flux"  # VAE and text encoders from the folder


def test_quantised_files_draw_what_full_precision_draws(quant_home):
    engine = Engine(quant_home, device="cpu")
    ref = _image(engine, "wide-flux-f32")
    got = {n: _image(engine, f"wide-flux-{n}") for n in ("Q8_0", "Q4_0", "fp8", "fp8-scaled")}
    scores = {n: _psnr(ref, im) for n, im in got.items()}
    # measured: Q8_0 57 dB, fp8 and scaled fp8 47 dB, Q4_0 39 dB
    assert scores["Q8_0"] > 45 and scores["fp8"] > 40 and scores["fp8-scaled"] > 40 and scores["Q4_0"] > 30, scores
    assert scores["Q8_0"] > scores["Q4_0"] + 6, scores  # more bits, closer
    assert not np.array_equal(got["Q4_0"], ref)  # quantisation really happened


def test_scaled_fp8_weights_are_multiplied_back(quant_home):
    """Each scaled-fp8 weight is stored divided by its layer's scale: loaded, it must be the original weight to
    fp8's precision (3 mantissa bits), not the stored quotient."""
    from imagesmith.models.loaders import load_transformer_file, read_model_header
    ckpt = quant_home.models_dir / "checkpoints"
    ref = load_transformer_file(ckpt / "wide-flux-f32.safetensors", "flux",
                                read_model_header(ckpt / "wide-flux-f32.safetensors"), torch.float32).state_dict()
    path = ckpt / "wide-flux-fp8-scaled.safetensors"
    got = load_transformer_file(path, "flux", read_model_header(path), torch.float32).state_dict()
    assert set(got) == set(ref)
    for k, w in ref.items():
        if w.ndim == 2:
            err = (got[k] - w).abs().max() / w.abs().max()
            assert err < 1 / 16, (k, float(err))


def test_gguf_layers_stay_quantised_in_memory(quant_home):
    from imagesmith.models.loaders import load_transformer_file, read_model_header
    path = quant_home.models_dir / "checkpoints" / "wide-flux-Q4_0.gguf"
    model = load_transformer_file(path, "flux", read_model_header(path), torch.float32)
    kinds = {type(p).__name__ for p in model.parameters()}
    assert "GGUFParameter" in kinds  # diffusers keeps the Q4_0 blocks and dequantises per call
    packed = sum(p.numel() * p.element_size() for p in model.parameters())
    full = (quant_home.models_dir / "checkpoints" / "wide-flux-f32.safetensors").stat().st_size
    assert packed < 0.5 * full


def test_bad_quantised_files_are_one_clear_error(quant_home, tmp_path):
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    ckpt = settings.models_dir / "checkpoints"
    shutil.copytree(quant_home.models_dir / "checkpoints" / "tiny-flux", ckpt / "tiny-flux")
    whole = (quant_home.models_dir / "checkpoints" / "wide-flux-Q8_0.gguf").read_bytes()
    (ckpt / "truncated.gguf").write_bytes(whole[: len(whole) // 3])
    (ckpt / "not-gguf.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    # a real GGML type that diffusers cannot dequantise (IQ2_XXS), beside ordinary tensors
    from gguf.quants import quant_shape_to_byte_shape
    w = gguf.GGUFWriter(str(ckpt / "flux-iq2.gguf"), "flux")
    iq2 = gguf.GGMLQuantizationType.IQ2_XXS
    w.add_tensor("double_blocks.0.img_attn.qkv.weight",
                 np.zeros(quant_shape_to_byte_shape((96, 256), iq2), np.uint8), raw_dtype=iq2)
    w.add_tensor("single_blocks.0.linear1.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert probe(ckpt / "flux-iq2.gguf").notes[0] == "GGUF IQ2_XXS"
    engine = Engine(settings, device="cpu")
    for name, why in (("truncated", "truncated or damaged GGUF"), ("not-gguf", "GGUF"),
                      ("flux-iq2", "quantisation type IQ2_XXS is not one")):
        req = GenerateRequest(prompt="x", model=name, width=64, height=64, steps=1)
        with pytest.raises(Exception) as info:
            engine.generate(req)
        message = str(info.value)
        assert why in message and len(message.splitlines()) == 1, message
        entry = engine.registry.get(name, "checkpoint")
        assert engine._pipeline_key(entry) not in engine.cache  # nothing kept half-loaded
    assert engine.cache.keys() == []


def test_sd3_gguf_in_the_original_layout(tiny_home, tmp_path):
    """An SD3/SD3.5 GGUF (city96's layout: the MMDiT's own joint_blocks names), Q8_0, beside its diffusers folder:
    named by the probe and drawing what the full-precision model draws."""
    from safetensors import safe_open

    from imagesmith.models.probe import read_header
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    ckpt = settings.models_dir / "checkpoints"
    shutil.copytree(tiny_home.models_dir / "checkpoints" / "tiny-sd3", ckpt / "tiny-sd3")
    single = tiny_home.models_dir / "checkpoints" / "tiny-sd3-single.safetensors"
    from fixtures.tiny import write_gguf
    with safe_open(str(single), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
    write_gguf(ckpt / "sd3-Q8_0.gguf", state, "sd3", "Q8_0",
               {META_CONFIGS: read_header(single).metadata[META_CONFIGS]})
    quantised = sum(v.ndim == 2 and v.shape[1] % 32 == 0 for v in state.values())
    assert quantised > 10 and any(k.startswith("model.diffusion_model.joint_blocks.") for k in read_header(single).shapes)
    res = probe(ckpt / "sd3-Q8_0.gguf")
    assert (res.arch, res.notes[0], res.components) == ("sd3", "GGUF Q8_0", ["transformer"])
    engine = Engine(settings, device="cpu")
    ref, got = _image(engine, "tiny-sd3"), _image(engine, "sd3-Q8_0")
    assert _psnr(ref, got) > 45  # measured 56 dB


def test_comfyui_gguf_workflow_runs_unchanged(quant_home, tmp_path):
    """A ComfyUI-GGUF workflow (its UnetLoaderGGUF node) in API format: the GGUF transformer as the MODEL, CLIP and
    VAE from a FLUX checkpoint loader, through imagesmith's ComfyUI executor."""
    from fixtures.graph import run_to_image
    from imagesmith.engine.graph.nodes import model_lists
    engine = Engine(quant_home, device="cpu")
    lists = model_lists(engine.registry, ["Lanczos"])
    assert lists["unet_gguf"] == ["wide-flux-Q4_0.gguf", "wide-flux-Q8_0.gguf"]
    prompt = {
        "1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "wide-flux-Q8_0.gguf"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-flux"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["2", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["2", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "gguf", "images": ["6", 0]}}}
    image = run_to_image(engine, prompt, tmp_path, lists=lists, save_node="7")
    assert image.shape[:2] == (64, 64) and image.std() > 0


def test_bitsandbytes_nf4_file_is_dequantised_exactly_as_bitsandbytes_does(quant_home, tmp_path):
    """An NF4 file laid out as Forge's flux1-dev-bnb-nf4 (each weight's packed codes beside its quant state, as
    bitsandbytes' Params4bit saves them), quantised by bitsandbytes itself: imagesmith reads it without
    bitsandbytes, and each weight equals bitsandbytes' own dequantize_4bit of it."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    from safetensors import safe_open

    from imagesmith.models.loaders import load_transformer_file, read_model_header
    ckpt = quant_home.models_dir / "checkpoints"
    src = ckpt / "wide-flux-f32.safetensors"
    out, expect, original = {}, {}, {}
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            t = f.get_tensor(k)
            if t.ndim == 2 and t.numel() % 64 == 0:
                q, state = bnb.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
                out["model.diffusion_model." + k] = q
                for name, v in state.as_dict(packed=True).items():
                    out[f"model.diffusion_model.{k}.{name}"] = v
                original[k] = t
                if t.shape[1] % 64 == 0:  # (bitsandbytes 0.50's CPU dequantize_4bit is off where rows and blocks
                    expect[k] = bnb.dequantize_4bit(q, state)  # do not line up: there the original is the reference)
            else:
                out["model.diffusion_model." + k] = t
    path = ckpt / "wide-flux-nf4.safetensors"
    save_file(out, str(path), metadata=meta)
    try:
        assert probe(path).notes[0] == "bitsandbytes NF4: kept 4-bit, dequantised per call"
        from imagesmith.models.bnb4 import dequantize_state
        with safe_open(str(path), "pt") as f:
            got = dequantize_state(f.get_tensor, list(f.keys()), torch.float32)
        assert len(got) == len(original) > 10 and len(expect) >= 5
        for k, w in expect.items():
            assert torch.equal(got["model.diffusion_model." + k], w), k  # bit for bit bitsandbytes' answer
        for k, w in original.items():  # every weight within NF4's rounding of what was quantised
            blocks = w.flatten().reshape(-1, 64).abs().amax(1).repeat_interleave(64).reshape(w.shape)
            assert ((got["model.diffusion_model." + k] - w).abs() <= 0.16 * blocks + 1e-6).all(), k
        from imagesmith.models.bnb4 import Packed4bitLinear
        model = load_transformer_file(path, "flux", read_model_header(path), torch.float32)
        plain = load_transformer_file(path, "flux", read_model_header(path), torch.float32, keep_4bit=False)
        packed = [m for m in model.modules() if isinstance(m, Packed4bitLinear)]
        assert len(packed) >= 8  # every 4-bit layer, after BFL -> diffusers (fused qkv split into q, k, v)
        half = load_transformer_file(path, "flux", read_model_header(path), torch.bfloat16)
        assert sum(isinstance(m, Packed4bitLinear) for m in half.modules()) == len(packed)  # from bf16 values too
        held = sum(b.numel() * b.element_size() for m in packed for b in (m.codes, m.absmax))
        full = sum(m.in_features * m.out_features * 4 for m in packed)
        assert held < full / 6  # float32 would be 8 times the codes; the scales add 1/16
        # the packed layers give exactly the dequantised weights
        for m in packed:
            name = next(n for n, mod in model.named_modules() if mod is m)
            assert torch.equal(m.dequantized(torch.float32), plain.get_submodule(name).weight), name
        engine = Engine(quant_home, device="cpu")
        base = _image(engine, "wide-flux-nf4")
        score = _psnr(_image(engine, "wide-flux-f32"), base)
        assert score > 25, score  # 4-bit: further than Q8_0, still the same picture
        # a LoRA on the 4-bit model: its layers go back to plain ones for the adapter, and it acts as on full precision
        lora = _flux_lora(plain, quant_home.models_dir / "loras" / "wide-lora.safetensors")
        with_lora = _image(engine, "wide-flux-nf4", "<lora:wide-lora:1>")
        assert np.abs(with_lora - base).max() > 8  # the LoRA changed the picture
        assert _psnr(with_lora, _image(engine, "wide-flux-f32", "<lora:wide-lora:1>")) > 25
        lora.unlink()
    finally:
        path.unlink()


def _flux_lora(model, path):
    """A peft LoRA (rank 4, attention and MLP input projections, B randomised so it acts) on a FLUX transformer, saved as diffusers'
    FluxPipeline saves one."""
    import copy

    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from fixtures.tiny import save_peft_lora
    model = copy.deepcopy(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp"]),
                      adapter_name="t")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="t").items()}
    return save_peft_lora(FluxPipeline, {"transformer": state}, path)


# where each K-quant block keeps its fp16 super-scales (llama.cpp's block_q4_K / q5_K / q6_K layouts)
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _k_blocks(shape: tuple[int, int], qname: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks for a weight of ``shape`` (gguf cannot quantise to K-quants; llama.cpp can): random
    packed values and sub-scales, fp16 super-scales of a sane size."""
    from gguf.quants import quant_shape_to_byte_shape
    qt = getattr(gguf.GGMLQuantizationType, qname)
    raw = rng.integers(0, 256, size=quant_shape_to_byte_shape(shape, qt), dtype=np.uint8)
    block = gguf.GGML_QUANT_SIZES[qt][1]
    blocks = raw.reshape(-1, block)
    for offset in K_SCALES[qname]:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    return raw


@pytest.mark.parametrize("qname", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_gguf_dequantises_as_llama_cpps_gguf_does(tmp_path, qname):
    """The K-quants most FLUX GGUF downloads use (Q4_K_S, Q5_K_S, Q6_K): a FLUX transformer wide enough for 256-value
    super-blocks, its 2-D weights stored as K-quant blocks; imagesmith loads it (through diffusers' GGUF layers,
    kept packed); each weight equals what gguf-py's own dequantiser (the llama.cpp project's reference) makes of those
    blocks to half precision (diffusers dequantises in fp16), and the forward pass the same transformer's with those
    weights."""
    from imagesmith.models.loaders import load_transformer_file, read_model_header
    cfg, bfl = _flux_bfl(seed=3, std=0.05, single=1, head_dim=128, axes=(16, 56, 56))  # 256 wide: K-quant blocks
    rng = np.random.default_rng(5)
    qt = getattr(gguf.GGMLQuantizationType, qname)
    w = gguf.GGUFWriter(str(tmp_path / f"flux-{qname}.gguf"), "flux")
    w.add_string(META_CONFIGS, json.dumps({"transformer": cfg}))
    reference, packed = {}, 0
    for k, v in bfl.items():
        if v.ndim == 2 and v.shape[1] % 256 == 0:
            blocks = _k_blocks(tuple(v.shape), qname, rng)
            w.add_tensor(k, blocks, raw_dtype=qt)
            reference[k] = torch.from_numpy(gguf.quants.dequantize(blocks, qt).astype(np.float32))
            packed += 1
        else:
            w.add_tensor(k, v.float().numpy())
            reference[k] = v.float()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert packed >= 8  # the attention and MLP weights of both blocks
    save_file(reference, str(tmp_path / "flux-ref.safetensors"), metadata={META_CONFIGS: json.dumps({"transformer": cfg})})
    assert probe(tmp_path / f"flux-{qname}.gguf").notes[0] == f"GGUF {qname}"
    path = tmp_path / f"flux-{qname}.gguf"
    ours = load_transformer_file(path, "flux", read_model_header(path), torch.float32)
    assert any(type(p).__name__ == "GGUFParameter" for p in ours.parameters())  # kept packed
    ref_path = tmp_path / "flux-ref.safetensors"
    ref = load_transformer_file(ref_path, "flux", read_model_header(ref_path), torch.float32)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        a, b = ours(**inputs)[0], ref(**inputs)[0]
    err = float((a - b).abs().max() / b.abs().max())
    assert b.abs().max() > 0.1 and err < 5e-3, err  # the weights' half-precision rounding, through the blocks
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
    ref_state = ref.state_dict()
    checked = 0
    for name, p in ours.named_parameters():
        if type(p).__name__ == "GGUFParameter":
            got, want = dequantize_gguf_tensor(p).float(), ref_state[name]
            # diffusers dequantises in half precision (as ComfyUI-GGUF does), gguf-py in single: fp16's rounding
            assert got.shape == want.shape and float((got - want).abs().max()) <= 2e-3 * float(want.abs().max()), name
            checked += 1
    assert checked >= 8
