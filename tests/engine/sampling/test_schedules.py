"""Every ComfyUI scheduler's sigmas against ComfyUI 0.3.64's own (1e-5 relative), on SD1's discrete epsilon
schedule and SD3's shifted flow, for 1, 2, 4, 10, 20 and 30 steps."""

import math

import pytest
import torch

from imagesmith.core.errors import BadRequest
from imagesmith.core.sampling_names import canonical_schedule
from imagesmith.engine.sampling import schedules as S
from fixtures import sampling_oracle as O

CASES = [(m, name, steps) for m in O.MODELS for name in O.oracle()["sigmas"][m]["by_scheduler"]
         for steps in O.oracle()["sigmas"][m]["by_scheduler"][name]]


def test_the_model_tables_match():
    ms = O.model_sampling("sd1_eps")
    ref = O.oracle()["sigmas"]["sd1_eps"]
    assert math.isclose(float(ms.sigma_min), ref["sigma_min"], rel_tol=1e-6)
    assert math.isclose(float(ms.sigma_max), ref["sigma_max"], rel_tol=1e-6)


@pytest.mark.parametrize("model,name,steps", CASES)
def test_schedule_matches_comfyui(model, name, steps):
    expected = O.oracle()["sigmas"][model]["by_scheduler"][name][steps]
    got = S.make_sigmas(name, O.model_sampling(model), int(steps)).tolist()
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected):
        if math.isnan(e):
            assert math.isnan(g)
        else:
            assert math.isclose(g, e, rel_tol=1e-5, abs_tol=1e-7), (g, e)


# A1111's schedule types that ComfyUI lacks, against values worked out by hand from A1111 1.10's published
# definitions (modules/sd_schedulers.py): facts, not this code's output.
def test_uniform_is_the_evenly_spaced_timesteps():
    ms = O.model_sampling("sd1_eps")
    got = S.make_sigmas("Uniform", ms, 4)
    # timesteps 999, 666, 333, 0 of SD1's table, then 0
    expected = [float(ms.sigmas[999]), float(ms.sigmas[666]), float(ms.sigmas[333]), float(ms.sigmas[0]), 0.0]
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-6)


def test_polyexponential_with_rho_1_is_log_linear():
    ms = O.model_sampling("sd1_eps")
    got = S.make_sigmas("Polyexponential", ms, 3)
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    expected = [hi, math.sqrt(lo * hi), lo, 0.0]
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-5)


def test_align_your_steps_uses_nvidias_tables():
    ms = O.model_sampling("sd1_eps")
    # 11 steps: the published SD1.5 table itself, then 0
    assert S.make_sigmas("Align Your Steps", ms, 11).tolist() == pytest.approx(
        [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0.0], rel=1e-6)
    # SDXL's table, resampled log-linearly: the ends are kept, the middle of 3 points is the table's middle
    # entry in log space (entry 5 of 11 sits at x = 0.5 exactly)
    sdxl = S.make_sigmas("AYS", ms, 3, family="sdxl").tolist()
    assert sdxl == pytest.approx([14.615, 0.862, 0.029, 0.0], rel=1e-5)
    # 6 points: x = 0.2 falls on entry 2 exactly (2 / 10)
    six = S.make_sigmas("align_your_steps", ms, 6).tolist()
    assert six[1] == pytest.approx(3.861, rel=1e-5) and six[-2] == pytest.approx(0.029, rel=1e-5)
    with pytest.raises(BadRequest, match="flow"):
        S.make_sigmas("Align Your Steps", O.model_sampling("sd3_flow_shift3"), 10)


@pytest.mark.parametrize("spelling,name", [("Karras", "karras"), ("SGM Uniform", "sgm_uniform"),
                                           ("sgm_uniform", "sgm_uniform"), ("KL Optimal", "kl_optimal"),
                                           ("DDIM", "ddim_uniform"), ("Automatic", "automatic"),
                                           ("Align Your Steps", "align_your_steps"), ("Beta", "beta")])
def test_either_spelling(spelling, name):
    assert canonical_schedule(spelling) == name


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(BadRequest, match="unknown schedule 'fancy'.*Karras.*sgm_uniform"):
        canonical_schedule("fancy")
    with pytest.raises(BadRequest, match="steps"):
        S.make_sigmas("karras", O.model_sampling("sd1_eps"), 0)
