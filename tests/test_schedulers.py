"""sd-scripts sampler names -> diffusers schedulers (library.prompts.samplers)."""
from __future__ import annotations

import importlib.util
import warnings

import pytest

from library.errors import UserError
from library.prompts.samplers import (
    SAMPLER_ALIASES,
    SAMPLER_NAMES,
    SAMPLERS,
    SamplerNameError,
    a1111_sampler_label,
    canonical_sampler_name,
    make_scheduler,
    noises_per_step,
    sampler_from_a1111_label,
    scheduler_config,
)

HAS_SCIPY = importlib.util.find_spec("scipy") is not None

EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "k_heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


def test_every_sd_scripts_name_is_known():
    assert set(SAMPLER_NAMES) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_every_sampler_builds_with_the_sdxl_schedule_and_sets_timesteps(name):
    if SAMPLERS[canonical_sampler_name(name)]["class"] == "LMSDiscreteScheduler" and not HAS_SCIPY:
        pytest.skip("LMSDiscreteScheduler needs scipy, which is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation notes (e.g. for algorithm 'dpmsolver')
        scheduler = make_scheduler(name)
        scheduler.set_timesteps(4)
    assert type(scheduler).__name__ == EXPECTED_CLASSES[name]
    config = scheduler.config
    assert config.beta_schedule == "scaled_linear"
    assert config.beta_start == pytest.approx(0.00085) and config.beta_end == pytest.approx(0.012)
    assert config.num_train_timesteps == 1000 and config.prediction_type == "epsilon"
    timesteps = scheduler.timesteps
    assert len(timesteps) >= 4 and float(timesteps.max()) < 1000 and float(timesteps.min()) >= 0


def test_dpmsolver_variants_select_their_algorithm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert make_scheduler("dpmsolver").config.algorithm_type == "dpmsolver"
        assert make_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"


def test_sd_scripts_quiet_defaults():
    ddim = make_scheduler("ddim")
    assert ddim.config.clip_sample is False and ddim.config.steps_offset == 1


def test_base_config_overrides_schedule_and_unknown_keys_are_dropped():
    scheduler = make_scheduler(
        "Euler_A", {"prediction_type": "v_prediction", "beta_end": 0.02, "solver_order": 3, "_class_name": "X"}
    )
    assert type(scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_end == pytest.approx(0.02)
    # the sampler's own setting wins over a base config's
    _, config = scheduler_config("dpmsolver++", {"algorithm_type": "sde-dpmsolver++"})
    assert config["algorithm_type"] == "dpmsolver++"


def test_unknown_name_lists_valid_names():
    with pytest.raises(SamplerNameError) as info:
        make_scheduler("eular_a")
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "eular_a" in message and "did you mean 'euler_a'" in message
    for name in SAMPLER_NAMES:
        assert name in message


def test_lms_without_scipy_is_a_clear_error(monkeypatch):
    import builtins

    import diffusers

    class Placeholder:  # what diffusers exposes when an optional dependency is missing
        def __init__(self, *args, **kwargs):
            raise ImportError("needs scipy")

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name == "scipy":
            raise ImportError("no scipy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(diffusers, "LMSDiscreteScheduler", Placeholder, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(UserError, match="pip install scipy"):
        make_scheduler("k_lms")


def test_a1111_labels_and_back():
    assert a1111_sampler_label("euler_a") == "Euler a"
    assert a1111_sampler_label("K_EULER_A") == "Euler a"
    assert a1111_sampler_label("dpmsolver++") == "DPM++ 2M"
    for name in SAMPLERS:
        assert sampler_from_a1111_label(a1111_sampler_label(name)) == name
    assert sampler_from_a1111_label("UniPC") is None
    assert all(alias in SAMPLER_NAMES for alias in SAMPLER_ALIASES)


def test_noises_per_step():
    assert noises_per_step("k_dpm_2_a") == 2 and noises_per_step("euler_a") == 1
