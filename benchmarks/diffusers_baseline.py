"""The diffusers schedulers nearest to imagesmith's samplers: the baseline that benchmarks (plain diffusers,
same work) compare the engine against. The engine itself never uses them; it samples on engine.sampling.
A1111 sampler names -> diffusers schedulers, built with `from_config` on the model's own scheduler config."""

from __future__ import annotations

from dataclasses import dataclass, field

import diffusers

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import SAMPLERS
from imagesmith.core.sampling_names import resolve_sampling, sampler_label

SCHEDULES = ("normal", "karras", "exponential")


@dataclass(frozen=True)
class SamplerSpec:
    cls: str
    kwargs: dict = field(default_factory=dict)
    schedules: tuple[str, ...] = SCHEDULES


_NOISE_SCHEDULES = ("normal", "karras", "exponential")
# A1111 name -> diffusers scheduler for epsilon/v-prediction models (SD1, SD2, SDXL).
_DIFFUSION: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec("EulerDiscreteScheduler"),
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler", schedules=("normal",)),
    "Heun": SamplerSpec("HeunDiscreteScheduler"),
    "LMS": SamplerSpec("LMSDiscreteScheduler"),
    "DPM2": SamplerSpec("KDPM2DiscreteScheduler"),
    "DPM2 a": SamplerSpec("KDPM2AncestralDiscreteScheduler"),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler",
                            {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": SamplerSpec("DPMSolverSDEScheduler"),
    "DPM++ 2M SDE": SamplerSpec("DPMSolverMultistepScheduler",
                                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DDIM": SamplerSpec("DDIMScheduler", schedules=("normal",)),
    "UniPC": SamplerSpec("UniPCMultistepScheduler"),
    "LCM": SamplerSpec("LCMScheduler", schedules=("normal",)),
}
# Flow-matching models (SD3, FLUX) have their own solvers; the WebUI names map where one exists.
_FLOW: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec("FlowMatchEulerDiscreteScheduler"),
    "Heun": SamplerSpec("FlowMatchHeunDiscreteScheduler", schedules=("normal",)),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler",
                            {"algorithm_type": "dpmsolver++", "solver_order": 2,
                             "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "UniPC": SamplerSpec("UniPCMultistepScheduler",
                         {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
FLOW_ARCHS = ("sd3", "flux")


def samplers_for(arch: str) -> list[str]:
    table = _FLOW if arch in FLOW_ARCHS else _DIFFUSION
    return [name for name in SAMPLERS if name in table]


def make_scheduler(sampler_name: str, schedule: str, base_config: dict, arch: str):
    """A fresh scheduler for one request (schedulers hold per-run state, so never share one)."""
    name, schedule = resolve_sampling(sampler_name, schedule, flow=arch in FLOW_ARCHS)
    sampler_name = sampler_label(name)
    if schedule == "simple":
        schedule = "normal"  # diffusers' flow schedulers space sigmas like ComfyUI's simple
    table = _FLOW if arch in FLOW_ARCHS else _DIFFUSION
    spec = table.get(sampler_name)
    if spec is None:
        raise BadRequest(f"sampler {sampler_name!r} is not available for {arch} models; "
                         f"choose one of: {', '.join(samplers_for(arch))}")
    if schedule not in spec.schedules:
        raise BadRequest(f"sampler {sampler_name!r} supports schedule {', '.join(spec.schedules)} "
                         f"only on {arch} models, not {schedule!r} (SD3/FLUX still run on diffusers' schedulers)")
    cls = getattr(diffusers, spec.cls)
    kwargs = dict(spec.kwargs)
    if schedule == "karras":
        kwargs["use_karras_sigmas"] = True
    elif schedule == "exponential":
        kwargs["use_exponential_sigmas"] = True
    config = dict(base_config)
    if arch in FLOW_ARCHS and spec.cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        # carry the model's flow shift over from its FlowMatch scheduler config
        kwargs.setdefault("flow_shift", config.get("shift", 1.0))
        if config.get("use_dynamic_shifting"):
            kwargs.setdefault("use_dynamic_shifting", True)
    if arch not in FLOW_ARCHS and spec.cls in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                               "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                               "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                               "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                               "DPMSolverSDEScheduler"):
        # WebUI spaces k-diffusion timesteps evenly from the end ("trailing"-like); diffusers'
        # default for SD checkpoints is "leading", which wastes the last step. Keep the model's
        # own setting when it names one explicitly as trailing/linspace.
        if config.get("timestep_spacing", "leading") == "leading":
            kwargs.setdefault("timestep_spacing", "trailing" if spec.cls != "DPMSolverSDEScheduler" else "linspace")
    if spec.cls == "DPMSolverMultistepScheduler" and arch not in FLOW_ARCHS:
        # Multistep solvers end on a zero sigma in WebUI; avoids a noisy last step at low step counts.
        kwargs.setdefault("final_sigmas_type", "zero")
    if spec.cls == "DDIMScheduler":
        kwargs.setdefault("clip_sample", config.get("clip_sample", False))
    # from_config ignores keys the target class does not know, and reports them; keep it quiet.
    return cls.from_config(config, **kwargs)
