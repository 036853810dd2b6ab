"""Noise, timesteps, loss weights, optimizers and schedulers of the shared loop."""
from __future__ import annotations

import pytest
import torch

from library.config.train_config import OptimizerConfig
from library.errors import UserError
from library.families import noise as N
from library.train.loop_math import masked_mse, step_generator
from library.train.optim import build_optimizer, build_scheduler


def test_per_sample_generators_make_noise_independent_of_the_split():
    gens = lambda: [step_generator(1, 5, 0, i) for i in range(4)]  # noqa: E731
    latents = torch.zeros(4, 4, 8, 8)
    whole = N.sample_noise(latents, gens(), 0.1)
    g = gens()
    halves = torch.cat([N.sample_noise(latents[:2], g[:2], 0.1), N.sample_noise(latents[2:], g[2:], 0.1)])
    torch.testing.assert_close(whole, halves)
    t_whole = N.sample_timesteps(4, gens(), 0, 1000, torch.device("cpu"))
    g = gens()
    t_halves = torch.cat([N.sample_timesteps(2, g[:2], 0, 1000, torch.device("cpu")),
                          N.sample_timesteps(2, g[2:], 0, 1000, torch.device("cpu"))])
    assert torch.equal(t_whole, t_halves)


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    plain = N.sample_noise(latents, [step_generator(0, 0, 0, i) for i in range(2)], None)
    offset = N.sample_noise(latents, [step_generator(0, 0, 0, i) for i in range(2)], 0.5)
    diff = offset - plain
    assert diff.abs().sum() > 0
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))  # constant over h, w


def test_min_snr_weights_by_hand():
    ac = N.ddpm_alphas_cumprod()
    t = torch.tensor([10, 500, 990])
    snr = ac[t] / (1 - ac[t])
    w = N.min_snr_weights(t, ac, 5.0, v_prediction=False)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 1 and w[2] == pytest.approx(1.0)  # low-noise steps are down-weighted, high-noise ones untouched
    wv = N.min_snr_weights(t, ac, 5.0, v_prediction=True)
    torch.testing.assert_close(wv, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_add_noise_matches_diffusers_ddpm():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(N.add_noise(x, n, t, N.ddpm_alphas_cumprod()), sched.add_noise(x, n, t),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(N.v_target(x, n, t, N.ddpm_alphas_cumprod()), sched.get_velocity(x, n, t),
                               rtol=1e-5, atol=1e-5)


def test_masked_mse_ignores_masked_pixels():
    pred, target = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1  # left half counts
    assert masked_mse(pred, target, mask, None).item() == pytest.approx(0.5)
    assert masked_mse(pred, target, None, torch.tensor([2.0])).item() == pytest.approx(2.0)


def _params():
    return [{"params": [torch.nn.Parameter(torch.randn(64, 64))]}]


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "Adafactor", "SGDNesterov",
                                  "torch.optim.RMSprop"])
def test_named_optimizers_build_and_step(name):
    opt = build_optimizer(_params(), OptimizerConfig(optimizer_type=name, learning_rate=1e-3))
    p = opt.param_groups[0]["params"][0]
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(before, p.detach())


def test_optimizer_args_and_errors():
    opt = build_optimizer(_params(), OptimizerConfig(optimizer_args=["weight_decay=0.1", "betas=(0.9,0.99)"]))
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(UserError, match="unknown --optimizer_type"):
        build_optimizer(_params(), OptimizerConfig(optimizer_type="Adamm"))
    with pytest.raises(UserError, match="optimizer_args"):
        build_optimizer(_params(), OptimizerConfig(optimizer_args=["nonsense=1"]))
    with pytest.raises(UserError, match="key=value"):
        build_optimizer(_params(), OptimizerConfig(optimizer_args=["weight_decay"]))


def test_prodigy_missing_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import prodigyopt  # noqa: F401
        pytest.skip("prodigyopt is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="pip install prodigyopt"):
        build_optimizer(_params(), OptimizerConfig(optimizer_type="Prodigy"))


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_schedulers_with_fractional_warmup(name):
    opt = build_optimizer(_params(), OptimizerConfig(learning_rate=1.0))
    sched = build_scheduler(opt, OptimizerConfig(lr_scheduler=name, lr_warmup_steps=0.1), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    if name != "constant":
        assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)  # 10 warm-up steps
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < 0.1


def test_unknown_scheduler_is_clear():
    opt = build_optimizer(_params(), OptimizerConfig())
    with pytest.raises(UserError, match="unknown --lr_scheduler"):
        build_scheduler(opt, OptimizerConfig(lr_scheduler="cosine_annealing"), 10)


def test_non_finite_loss_stops_training_before_the_step(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch):
    import sdxl_train_network
    from library.train import loop
    from test_train_sdxl_network import run_toml

    original = loop.Trainer._loss

    def nan_on_second(self, batch, micro, first):
        loss = original(self, batch, micro, first)
        return loss * float("nan") if self.state.global_step == 1 else loss

    monkeypatch.setattr(loop.Trainer, "_loss", nan_on_second)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=3, network_train_unet_only=True)
    with pytest.raises(UserError, match="the loss is nan at step 2"):
        sdxl_train_network.main(["--config_file", cfg])
    assert not (tmp_path / "out" / "lora.safetensors").exists()  # nothing corrupted was saved


def test_non_finite_gradient_stops_training_before_the_step(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch):
    """A finite loss whose backward overflows: the check names the LoRA parameters and nothing is saved."""
    import sdxl_train_network
    from test_train_sdxl_network import run_toml

    nan_gradient_at_step_2(monkeypatch)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=3, network_train_unet_only=True)
    with pytest.raises(UserError, match=r"gradient is not finite at step 2 \(epoch 1\) in lora_unet_\w+"):
        sdxl_train_network.main(["--config_file", cfg])
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_logging_flag_errors_are_clear(tmp_path, tiny_sdxl_file, shapes_dataset):
    from conftest import run_script
    from test_train_sdxl_network import run_toml

    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], log_with="tensorboard")
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--logging_dir" in r.stderr


class _NanBackward(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_gradient_at_step_2(monkeypatch) -> None:
    """Make the trainer's second step produce NaN gradients (through a finite loss)."""
    from library.train import loop

    original = loop.Trainer._loss

    def nan_grad_on_second(self, batch, micro, first):
        loss = original(self, batch, micro, first)
        return _NanBackward.apply(loss) if self.state.global_step == 1 else loss

    monkeypatch.setattr(loop.Trainer, "_loss", nan_grad_on_second)
