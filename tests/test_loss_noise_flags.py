"""sd-scripts' loss and noise flags (issue #15, "Loss and noise"): each function against hand-worked values or
sd-scripts' definition, the per-sample generator rule (a sample's draws do not depend on the batch split), and
runs of sdxl_train_network.py on the tiny model showing that a flag changes the losses, and only when it should."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script, write_dataset_toml, write_toml
from test_train_sdxl_network import read_losses, run_toml

from library.families import noise as N
from library.train.loop_math import elementwise_loss, huber_threshold, loss_mask, masked_mse, training_loss


def gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def training_cfg(**overrides):
    from library.config.training_flags import TrainingConfig

    return TrainingConfig(**overrides)


# --- the loss ---------------------------------------------------------------------------------------------------
def test_default_loss_is_masked_mse_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.rand(3, 64, 64, generator=g)
    w = torch.rand(3, generator=g)
    for m, weights in [(None, None), (mask, None), (None, w), (mask, w)]:
        assert torch.equal(training_loss(pred, target, mask=m, weights=weights), masked_mse(pred, target, m, weights))


def test_l1_and_sample_weights_by_hand():
    pred = torch.tensor([1.0, -2.0, 0.5, 0.0]).view(2, 1, 1, 2)
    target = torch.zeros(2, 1, 1, 2)
    # per-sample l1 means: (1 + 2) / 2 = 1.5 and (0.5 + 0) / 2 = 0.25
    assert training_loss(pred, target, loss_type="l1").item() == pytest.approx((1.5 + 0.25) / 2)
    # prior_loss_weight 0.5 on the second sample (a regularization image), min-SNR-like weight 2 on the first
    got = training_loss(pred, target, loss_type="l1", sample_weights=torch.tensor([1.0, 0.5]),
                        weights=torch.tensor([2.0, 1.0]))
    assert got.item() == pytest.approx((1.5 * 2 + 0.25 * 0.5) / 2)


def test_huber_forms_follow_sd_scripts_definition():
    d = torch.tensor([0.05, 3.0]).view(2, 1, 1, 1)
    c = huber_threshold("constant", 0.1, 1.0, torch.tensor([0, 500]))
    huber = elementwise_loss(d, torch.zeros_like(d), "huber", c).flatten()
    smooth = elementwise_loss(d, torch.zeros_like(d), "smooth_l1", c).flatten()
    for i, x in enumerate([0.05, 3.0]):
        assert huber[i].item() == pytest.approx(2 * 0.1 * (math.sqrt(x * x + 0.01) - 0.1), rel=1e-5)
        assert smooth[i].item() == pytest.approx(2 * (math.sqrt(x * x + 0.01) - 0.1), rel=1e-5)
    # exponential: huber_scale at t=0, huber_c * huber_scale at t = 1000
    e = huber_threshold("exponential", 0.1, 2.0, torch.tensor([0, 1000]))
    assert e.tolist() == pytest.approx([2.0, 0.2], rel=1e-5)


def test_loss_mask_picks_conditioning_red_channel_only_with_masked_loss():
    cond = torch.zeros(2, 3, 8, 8)
    cond[:, 0, :4] = 1.0  # red in the top half
    alpha = torch.full((2, 8, 8), 0.5)
    batch = SimpleNamespace(conditioning_images=cond, alpha_masks=alpha)
    assert torch.equal(loss_mask(batch, True), cond[:, 0])
    assert loss_mask(batch, False) is alpha  # alpha masks apply with or without the flag, as in sd-scripts
    assert loss_mask(SimpleNamespace(conditioning_images=None, alpha_masks=alpha), True) is alpha
    assert loss_mask(SimpleNamespace(conditioning_images=None, alpha_masks=None), True) is None


# --- noise ------------------------------------------------------------------------------------------------------
def test_noise_offset_strength_draws_by_hand():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) + 0.3
    g = gens(2)
    got = N.sample_noise(latents, g, 0.1, adaptive_noise_scale=0.5, random_strength=True)
    want = []
    for i, gen in enumerate(gens(2)):
        base = torch.randn((1, 4, 8, 8), generator=gen)
        strength = torch.rand((1,), generator=gen) * 0.1
        offset = torch.randn((1, 4, 1, 1), generator=gen)
        s = torch.clamp(strength.view(1, 1, 1, 1) + 0.5 * latents[i:i + 1].mean(dim=(2, 3), keepdim=True).abs(), min=0)
        want.append(base + s * offset)
    torch.testing.assert_close(got, torch.cat(want))
    # without the new flags, the old draws exactly
    plain = N.sample_noise(latents, gens(2), 0.1)
    old = torch.cat([torch.randn((1, 4, 8, 8), generator=gen) + 0.1 * torch.randn((1, 4, 1, 1), generator=gen)
                     for gen in gens(2)])
    assert torch.equal(plain, old)


def test_pyramid_noise_is_normalised_per_sample_and_split_independent():
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    both = N.pyramid_noise(noise, gens(3), 6, 0.3)
    assert both.shape == noise.shape
    for i in range(3):
        assert both[i].std().item() == pytest.approx(1.0, rel=1e-5)
    alone = N.pyramid_noise(noise[1:2], gens(1, base=1), 6, 0.3)
    assert torch.equal(alone[0], both[1])
    assert (both - noise).abs().max() > 0.1


def test_constant_timestep_when_min_equals_max():
    t = N.sample_timesteps(3, gens(3), 500, 500, torch.device("cpu"))
    assert t.tolist() == [500, 500, 500]
    with pytest.raises(ValueError):
        N.sample_timesteps(1, gens(1), 600, 500, torch.device("cpu"))


def test_zero_terminal_snr_matches_the_rescaled_betas_route():
    ac = N.ddpm_alphas_cumprod()
    z = N.zero_terminal_snr_alphas_cumprod(ac)
    assert z[-1].item() == 0.0 and z[0].item() == pytest.approx(ac[0].item(), rel=1e-6)
    # sd-scripts' route: rescale sqrt(alpha_bar), turn it back into betas, cumprod(1 - betas)
    betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]]).double()
    root = torch.cumprod(1 - betas, 0).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    bar = root ** 2
    new_betas = 1 - torch.cat([bar[:1], bar[1:] / bar[:-1]])
    torch.testing.assert_close(z.double(), torch.cumprod(1 - new_betas, 0), atol=1e-6, rtol=1e-5)


def test_snr_weights_by_hand():
    ac = torch.tensor([0.999999, 0.8, 0.5, 0.2])  # SNRs 999999 (capped at 1000), 4, 1, 0.25
    t = torch.tensor([0, 1, 2, 3])
    snr = torch.tensor([1000.0, 4.0, 1.0, 0.25])
    torch.testing.assert_close(N.v_pred_scale(t, ac), snr / (snr + 1))
    torch.testing.assert_close(N.v_pred_like_weights(t, ac, 0.2), 1 + 0.2 * (snr + 1) / snr)
    torch.testing.assert_close(N.debiased_weights(t, ac, v_prediction=False), 1 / snr.sqrt())
    torch.testing.assert_close(N.debiased_weights(t, ac, v_prediction=True), 1 / (snr + 1))


def _no_models():
    """SDXL's models for hooks that read none of them (the loss target and weights): stand-ins."""
    from library.families.sdxl import SDXLFamilyModels

    return SDXLFamilyModels(denoiser=torch.nn.Identity(), vae=torch.nn.Identity())


def _sdxl_inputs(v_parameterization: bool = False, **flags):
    from library.config.model_flags import ModelConfig
    from library.families.sdxl import SDXLFamily

    fam = SDXLFamily(ModelConfig(v_parameterization=v_parameterization))
    cfg = training_cfg(**flags)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return fam, cfg, latents, fam.noise_and_timesteps(latents, gens(2), cfg)


def test_sdxl_defaults_draw_exactly_as_before():
    fam, cfg, latents, inp = _sdxl_inputs()
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens(2)])
    g2 = gens(2)
    for g in g2:
        torch.randn((1, 4, 8, 8), generator=g)
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in g2])
    assert torch.equal(inp.noise, noise) and torch.equal(inp.timesteps, t)
    assert torch.equal(inp.noisy, N.add_noise(latents, noise, t, fam.alphas_cumprod))
    assert fam.loss_weights(_no_models(), inp, cfg) is None and fam.huber_threshold(inp, cfg) is None


def test_sdxl_ip_noise_gamma_perturbs_the_input_not_the_target():
    fam, cfg, latents, plain = _sdxl_inputs()
    _, cfg_ip, _, ip = _sdxl_inputs(ip_noise_gamma=0.1)
    assert torch.equal(ip.noise, plain.noise) and torch.equal(ip.timesteps, plain.timesteps)
    assert not torch.equal(ip.noisy, plain.noisy)
    assert torch.equal(fam.loss_target(_no_models(), latents, ip), plain.noise)


def test_sdxl_loss_weights_multiply_in_sd_scripts_order():
    fam, cfg, latents, inp = _sdxl_inputs(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True,
                                          v_pred_like_loss=0.1, debiased_estimation_loss=True)
    ac, t = fam.alphas_cumprod, inp.timesteps
    want = (N.min_snr_weights(t, ac, 5.0, False) * N.v_pred_scale(t, ac) * N.v_pred_like_weights(t, ac, 0.1)
            * N.debiased_weights(t, ac, False))
    torch.testing.assert_close(fam.loss_weights(_no_models(), inp, cfg), want)


def test_sdxl_zero_terminal_snr_changes_the_schedule_the_loop_uses():
    fam, cfg, latents, inp = _sdxl_inputs(v_parameterization=True, zero_terminal_snr=True, min_timestep=999,
                                          max_timestep=999)
    assert inp.timesteps.tolist() == [999, 999]
    torch.testing.assert_close(inp.noisy, inp.noise)  # the last timestep is pure noise
    v = fam.loss_target(_no_models(), latents, inp)
    torch.testing.assert_close(v, -latents)  # v = sqrt(a) noise - sqrt(1 - a) x0 with a = 0


def test_training_config_checks():
    from library.errors import UserError

    with pytest.raises(UserError, match="min_timestep"):
        training_cfg(min_timestep=600, max_timestep=500)
    with pytest.raises(UserError, match="0 to 999"):
        training_cfg(min_timestep=1000, max_timestep=1000)
    assert training_cfg(min_timestep=500, max_timestep=500).max_timestep == 500


# --- FLUX -------------------------------------------------------------------------------------------------------
def test_flux_timestep_density_and_loss_weighting_by_hand():
    from library.families.flux_sigmas import loss_weighting, timestep_density

    u = timestep_density(2, gens(2), "logit_normal", 0.5, 2.0, 1.29)
    want = torch.sigmoid(0.5 + 2.0 * torch.cat([torch.randn((1,), generator=g) for g in gens(2)]))
    torch.testing.assert_close(u, want)
    m = timestep_density(2, gens(2), "mode", 0.0, 1.0, 1.29)
    r = torch.cat([torch.rand((1,), generator=g) for g in gens(2)])
    torch.testing.assert_close(m, 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r))
    s = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(loss_weighting("sigma_sqrt", s), torch.tensor([4.0, 16.0]))
    torch.testing.assert_close(loss_weighting("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    assert loss_weighting("uniform", s) is None and loss_weighting("logit_normal", s) is None


def test_flux_sigma_sampling_follows_weighting_scheme():
    from library.config.flux_config import FluxConfig
    from library.families.flux_sigmas import sample_sigmas, shift_sigmas

    uniform = sample_sigmas(4, gens(4), FluxConfig(), 16)
    again = sample_sigmas(4, gens(4), FluxConfig(weighting_scheme="none"), 16)
    assert torch.equal(uniform, again)  # uniform and none draw the steps as before
    ln = sample_sigmas(4, gens(4), FluxConfig(weighting_scheme="logit_normal", logit_mean=1.0), 16)
    u = torch.sigmoid(1.0 + torch.cat([torch.randn((1,), generator=g) for g in gens(4)]))
    idx = (u * 1000).long().float()
    torch.testing.assert_close(ln, shift_sigmas((1000 - idx) / 1000, 3.0))


def test_flux_ignores_noise_offset_with_one_warning(capsys):
    from library.families.flux import FluxFamily

    fam = FluxFamily()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = fam.noise_and_timesteps(latents, gens(2), SimpleNamespace(noise_offset=None))
    offset = fam.noise_and_timesteps(latents, gens(2), SimpleNamespace(noise_offset=0.5, min_snr_gamma=5.0))
    assert torch.equal(plain.noise, offset.noise) and torch.equal(plain.noisy, offset.noisy)
    fam.noise_and_timesteps(latents, gens(2), SimpleNamespace(noise_offset=0.5, min_snr_gamma=5.0))
    err = capsys.readouterr().err
    assert err.count("--noise_offset, --min_snr_gamma") == 1 and "FLUX training does not use them" in err


def test_flux_ip_noise_gamma_and_huber_threshold():
    from library.families.flux import FluxFamily

    fam = FluxFamily()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = fam.noise_and_timesteps(latents, gens(2), SimpleNamespace(noise_offset=None))
    cfg = SimpleNamespace(noise_offset=None, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=False)
    ip = fam.noise_and_timesteps(latents, gens(2), cfg)
    assert torch.equal(ip.noise, plain.noise) and torch.equal(ip.timesteps, plain.timesteps)
    assert not torch.equal(ip.noisy, plain.noisy)
    h = fam.huber_threshold(plain, SimpleNamespace(loss_type="huber", huber_schedule="exponential", huber_c=0.1,
                                                   huber_scale=1.0))
    torch.testing.assert_close(h, torch.exp(math.log(0.1) * plain.timesteps.float()))


def test_flux_huber_snr_is_refused_up_front():
    import argparse

    from library.config.flux_config import flux_model_config
    from library.errors import UserError

    with pytest.raises(UserError, match="huber_schedule"):
        flux_model_config(argparse.Namespace(loss_type="huber", huber_schedule="snr"))


# --- through the script -----------------------------------------------------------------------------------------
def _train(tmp_path: Path, model: str, dataset: str, name: str, **flags) -> list[float]:
    cfg = run_toml(tmp_path, model, dataset, name=name, **flags)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = read_losses(tmp_path / f"{name}_loss.jsonl")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    return losses


def test_loss_and_noise_flags_change_the_sdxl_losses(tmp_path, tiny_sdxl_file, shapes_dataset):
    base = _train(tmp_path, tiny_sdxl_file, shapes_dataset["config"], "base")
    l1 = _train(tmp_path, tiny_sdxl_file, shapes_dataset["config"], "l1", loss_type="l1")
    assert l1 != base
    fixed_t = _train(tmp_path, tiny_sdxl_file, shapes_dataset["config"], "fixed_t", min_timestep=500,
                     max_timestep=500)
    assert fixed_t != base
    noisy = _train(tmp_path, tiny_sdxl_file, shapes_dataset["config"], "noisy", loss_type="huber",
                   huber_schedule="snr", noise_offset=0.1, adaptive_noise_scale=0.01,
                   noise_offset_random_strength=True, multires_noise_iterations=4, multires_noise_discount=0.3,
                   ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, debiased_estimation_loss=True,
                   min_snr_gamma=5.0)
    assert noisy != base


def test_masked_loss_uses_the_conditioning_image(tmp_path, tiny_sdxl_file, shapes_dataset):
    plain = _train(tmp_path, tiny_sdxl_file, shapes_dataset["cn_config"], "cn_plain")
    masked = _train(tmp_path, tiny_sdxl_file, shapes_dataset["cn_config"], "cn_masked", masked_loss=True)
    assert masked != plain and all(m < p for m, p in zip(masked, plain))  # the black background counts zero


def test_prior_loss_weight_only_changes_runs_with_reg_images(tmp_path, tiny_sdxl_file, shapes_dataset):
    from library.data.synthetic import make_shapes_dataset

    reg = tmp_path / "reg"
    make_shapes_dataset(str(reg), 2, sizes=[(64, 64)], seed=7)
    img = shapes_dataset["image_dir"]
    with_reg = write_dataset_toml(tmp_path / "with_reg.toml", {"resolution": 64, "batch_size": 4, "subsets": [
        {"image_dir": img}, {"image_dir": str(reg), "is_reg": True}]}, general={"caption_extension": ".txt"})
    plain_toml = shapes_dataset["config"]
    base = _train(tmp_path, tiny_sdxl_file, plain_toml, "noreg_base")
    assert _train(tmp_path, tiny_sdxl_file, plain_toml, "noreg_prior", prior_loss_weight=0.25) == base
    reg_base = _train(tmp_path, tiny_sdxl_file, with_reg, "reg_base")
    reg_prior = _train(tmp_path, tiny_sdxl_file, with_reg, "reg_prior", prior_loss_weight=0.25)
    assert reg_prior != reg_base
    # the dataset TOML's key wins over the flag
    toml_key = write_toml(tmp_path / "with_reg_key.toml",
                          (tmp_path / "with_reg.toml").read_text().replace("[general]\n",
                                                                           "[general]\nprior_loss_weight = 0.25\n"))
    assert _train(tmp_path, tiny_sdxl_file, toml_key, "reg_key", prior_loss_weight=1.0) == reg_prior
