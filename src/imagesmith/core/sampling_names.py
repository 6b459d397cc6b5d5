"""The vocabulary of samplers and schedules, as A1111 and ComfyUI spell them: names, aliases, A1111's
'Automatic' schedule of each sampler, and what each sampler needs. Pure data, so requests can be validated at
the edge; the algorithms live in engine.sampling.

A sampler's canonical name is ComfyUI's (`dpmpp_2m`); its label is A1111's where A1111 has it (`DPM++ 2M`).
Either spelling is accepted everywhere, and so are A1111's pre-1.9 combined names (`DPM++ 2M Karras`) and its
k-diffusion aliases (`k_dpmpp_2m`)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadRequest


@dataclass(frozen=True)
class SamplerName:
    name: str
    """canonical (ComfyUI's) name"""
    label: str
    """A1111's label, or the ComfyUI name where A1111 has no such sampler"""
    aliases: tuple[str, ...] = ()
    automatic: str = "normal"
    """the schedule A1111's 'Automatic' picks for this sampler"""
    discard_penultimate: bool = False
    """the sampler skips the next-to-last sigma (DPM2, UniPC and 3M SDE in A1111/ComfyUI)"""
    noise: str | None = None
    """None (deterministic), 'ancestral' (a fresh draw per step) or 'brownian' (an SDE's Brownian tree)"""
    flow: bool = True
    """works on rectified-flow models (SD3, FLUX)"""
    cfg_pp: bool = False
    """a CFG++ variant (uses the unconditional prediction; CFG scale should be about 1)"""
    comfy: bool = True
    """listed by ComfyUI's KSampler"""


_S = SamplerName
SAMPLER_NAMES: tuple[SamplerName, ...] = (
    _S("euler", "Euler", ("k_euler",)),
    _S("euler_cfg_pp", "Euler CFG++", cfg_pp=True),
    _S("euler_ancestral", "Euler a", ("k_euler_a", "k_euler_ancestral"), noise="ancestral"),
    _S("euler_ancestral_cfg_pp", "Euler a CFG++", noise="ancestral", cfg_pp=True),
    _S("heun", "Heun", ("k_heun",)),
    _S("heunpp2", "HeunPP2"),
    _S("dpm_2", "DPM2", ("k_dpm_2",), discard_penultimate=True),
    _S("dpm_2_ancestral", "DPM2 a", ("k_dpm_2_a",), discard_penultimate=True, noise="ancestral"),
    _S("lms", "LMS", ("k_lms",)),
    _S("dpm_fast", "DPM fast", ("k_dpm_fast",), noise="ancestral"),
    _S("dpm_adaptive", "DPM adaptive", ("k_dpm_ad",), noise="ancestral"),
    _S("dpmpp_2s_ancestral", "DPM++ 2S a", ("k_dpmpp_2s_a",), automatic="karras", noise="ancestral"),
    _S("dpmpp_2s_ancestral_cfg_pp", "DPM++ 2S a CFG++", automatic="karras", noise="ancestral", cfg_pp=True),
    _S("dpmpp_sde", "DPM++ SDE", ("k_dpmpp_sde", "dpmpp_sde_gpu"), automatic="karras", noise="brownian"),
    _S("dpmpp_2m", "DPM++ 2M", ("k_dpmpp_2m",), automatic="karras"),
    _S("dpmpp_2m_cfg_pp", "DPM++ 2M CFG++", automatic="karras", cfg_pp=True, flow=False),
    _S("dpmpp_2m_sde", "DPM++ 2M SDE", ("k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"), automatic="exponential",
       noise="brownian"),
    _S("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
       automatic="exponential", noise="brownian"),
    _S("dpmpp_3m_sde", "DPM++ 3M SDE", ("k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"), automatic="exponential",
       discard_penultimate=False, noise="brownian"),
    _S("ddpm", "DDPM", noise="ancestral"),
    _S("lcm", "LCM", ("k_lcm",), noise="ancestral"),
    _S("ipndm", "iPNDM"),
    _S("ipndm_v", "iPNDM v"),
    _S("deis", "DEIS"),
    _S("res_multistep", "RES multistep"),
    _S("res_multistep_cfg_pp", "RES multistep CFG++", cfg_pp=True),
    _S("res_multistep_ancestral", "RES multistep a", noise="ancestral"),
    _S("res_multistep_ancestral_cfg_pp", "RES multistep a CFG++", noise="ancestral", cfg_pp=True),
    _S("gradient_estimation", "Gradient estimation"),
    _S("gradient_estimation_cfg_pp", "Gradient estimation CFG++", cfg_pp=True),
    _S("er_sde", "ER SDE", noise="ancestral"),
    _S("seeds_2", "SEEDS 2", noise="ancestral"),
    _S("seeds_3", "SEEDS 3", noise="ancestral"),
    _S("sa_solver", "SA-Solver", noise="ancestral"),
    _S("sa_solver_pece", "SA-Solver PECE", noise="ancestral"),
    _S("ddim", "DDIM", automatic="ddim_uniform"),
    _S("uni_pc", "UniPC", discard_penultimate=True),
    _S("uni_pc_bh2", "UniPC BH2", discard_penultimate=True),
    # A1111's own: Restart (Xu et al. 2023) and PLMS; not in ComfyUI's KSampler
    _S("restart", "Restart", automatic="karras", noise="ancestral", comfy=False),
    _S("plms", "PLMS", flow=False, comfy=False),
    _S("ddim_cfg_pp", "DDIM CFG++", automatic="ddim_uniform", cfg_pp=True, comfy=False),
)
SAMPLERS_BY_NAME = {s.name: s for s in SAMPLER_NAMES}


@dataclass(frozen=True)
class ScheduleName:
    name: str
    label: str
    comfy: bool = True
    a1111: bool = True
    flow: bool = True


SCHEDULE_NAMES: tuple[ScheduleName, ...] = (
    ScheduleName("automatic", "Automatic", comfy=False),
    ScheduleName("normal", "Normal"),
    ScheduleName("uniform", "Uniform", comfy=False),
    ScheduleName("simple", "Simple"),
    ScheduleName("sgm_uniform", "SGM Uniform"),
    ScheduleName("karras", "Karras"),
    ScheduleName("exponential", "Exponential"),
    ScheduleName("polyexponential", "Polyexponential", comfy=False),
    ScheduleName("ddim_uniform", "DDIM"),
    ScheduleName("beta", "Beta"),
    ScheduleName("linear_quadratic", "Linear Quadratic", a1111=False),
    ScheduleName("kl_optimal", "KL Optimal"),
    ScheduleName("align_your_steps", "Align Your Steps", comfy=False, flow=False),
)
SCHEDULES_BY_NAME = {s.name: s for s in SCHEDULE_NAMES}


def _key(text: str) -> str:
    return " ".join(text.strip().lower().replace("_", " ").replace("-", " ").split())


_SCHEDULE_KEYS: dict[str, str] = {}
for _s in SCHEDULE_NAMES:
    _SCHEDULE_KEYS[_key(_s.name)] = _s.name
    _SCHEDULE_KEYS[_key(_s.label)] = _s.name
_SCHEDULE_KEYS.update({"ddim": "ddim_uniform", "ays": "align_your_steps", "sgm": "sgm_uniform", "kl": "kl_optimal"})

_SAMPLER_KEYS: dict[str, str] = {}
for _s in SAMPLER_NAMES:
    for _n in (_s.name, _s.label, *_s.aliases):
        _SAMPLER_KEYS.setdefault(_key(_n), _s.name)
_SAMPLER_KEYS.update({_key("DPM++ 2M SDE Exponential"): "dpmpp_2m_sde"})


def schedule_choices() -> str:
    return ", ".join(s.label for s in SCHEDULE_NAMES)


def sampler_choices() -> str:
    return ", ".join(s.label for s in SAMPLER_NAMES)


def canonical_schedule(text: str) -> str:
    """'Karras', 'karras', 'SGM Uniform', 'sgm_uniform', 'Automatic' -> canonical name, else BadRequest."""
    name = _SCHEDULE_KEYS.get(_key(str(text)))
    if name is None:
        raise BadRequest(f"unknown schedule {text!r}; choose one of: {schedule_choices()} (ComfyUI's names "
                         f"work too: {', '.join(s.name for s in SCHEDULE_NAMES if s.comfy)})")
    return name


def split_sampler(text: str) -> tuple[str, str | None]:
    """A sampler name in any spelling -> (canonical sampler, schedule it names or None). A1111's pre-1.9
    combined names carry the schedule: 'DPM++ 2M Karras' -> ('dpmpp_2m', 'karras')."""
    key = _key(str(text))
    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], None
    for sched in ("karras", "exponential", "uniform", "sgm uniform", "polyexponential", "beta", "kl optimal",
                  "align your steps", "simple", "normal"):
        if key.endswith(" " + sched) and key[: -len(sched) - 1] in _SAMPLER_KEYS:
            return _SAMPLER_KEYS[key[: -len(sched) - 1]], _SCHEDULE_KEYS[sched]
    raise BadRequest(f"unknown sampler {text!r}; choose one of: {sampler_choices()} (ComfyUI's names work too, "
                     f"e.g. dpmpp_2m, euler_ancestral; and A1111's combined names, e.g. 'DPM++ 2M Karras')")


def resolve_sampling(sampler: str, schedule: str, *, flow: bool = False) -> tuple[str, str]:
    """(sampler, schedule) in any spelling -> canonical (sampler, concrete schedule), 'Automatic' resolved to
    the sampler's default; a combined sampler name's schedule wins over 'Automatic' only. Refuses combinations
    that cannot work, with the reason."""
    name, implied = split_sampler(sampler)
    sched = canonical_schedule(schedule)
    spec = SAMPLERS_BY_NAME[name]
    if sched == "automatic":
        sched = implied or spec.automatic
    if sched == "uniform":
        sched = "normal"  # A1111's Uniform is k-diffusion's evenly spaced timesteps: ComfyUI's normal
    if flow and not spec.flow:
        raise BadRequest(f"sampler {spec.label!r} works on epsilon/v-prediction models only, not on flow models "
                         f"(SD3, FLUX)")
    if flow and not SCHEDULES_BY_NAME[sched].flow:
        raise BadRequest(f"schedule {SCHEDULES_BY_NAME[sched].label!r} has tables for SD1.5/SDXL only, not for "
                         f"flow models (SD3, FLUX)")
    return name, sched


def sampler_label(name: str) -> str:
    return SAMPLERS_BY_NAME[name].label


def schedule_label(name: str) -> str:
    return SCHEDULES_BY_NAME[name].label
