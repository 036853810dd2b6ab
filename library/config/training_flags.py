"""Flags of the training run itself: steps, precision, noise and timesteps, attention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from library.config.environment_flags import warn_once
from library.config.flags import flag
from library.errors import UserError

# sd-scripts' --dynamo_backend choices (accelerate's list); several no longer exist in torch (a warning says so)
DYNAMO_BACKENDS: tuple[str, ...] = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser",
                                    "cudagraphs", "ofi", "fx2trt", "onnxrt", "tensort", "ipex", "tvm")


@dataclass
class TrainingConfig:
    """training"""

    # Where the datasets come from (a library.config.dataset_source.DatasetSource: a dataset TOML or the dataset
    # flags); built from the dataset flags, so not a flag itself. str() names it for messages.
    dataset_config: Any = None
    seed: int = flag(None, "random seed (unset: 42, so that runs repeat; sd-scripts picks a random one)", unset=42)
    max_train_steps: int = flag(1600, "training steps (optimizer updates)")
    max_train_epochs: int | None = flag(None, "training epochs (overrides --max_train_steps)")
    gradient_accumulation_steps: int = flag(1, "batches per optimizer update")
    max_token_length: int | None = flag(None, "caption length in tokens: 150 or 225 encode captions in 75-token "
                                              "pieces as sd-scripts does (unset: 75)", choices=(None, 150, 225))
    weighted_captions: bool = flag(False, "captions weight words as '(word:1.2)', '(word)', '[word]' (escape "
                                          "literal brackets as '\\(')")
    clip_skip: int | None = flag(None, "text-encoder layers to skip (accepted; SDXL and FLUX use fixed layers, as "
                                       "in sd-scripts, with a warning)")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory, slower)")
    mixed_precision: str = flag("no", "compute dtype of the frozen model and autocast", choices=["no", "fp16", "bf16"],
                                type=str)
    full_bf16: bool = flag(False, "keep the trainable weights and gradients in bf16 (needs --mixed_precision bf16)")
    full_fp16: bool = flag(False, "keep the trainable weights and gradients in fp16 (needs --mixed_precision fp16)")
    noise_offset: float | None = flag(None, "noise offset (e.g. 0.1): brighter brights and darker darks")
    min_snr_gamma: float | None = flag(None, "min-SNR loss weighting gamma (5 is the paper's value)")
    min_timestep: int = flag(None, "lowest timestep sampled in training (unset: 0)", unset=0)
    max_timestep: int = flag(None, "timestep bound sampled in training, exclusive (unset: 1000); equal to "
                                   "--min_timestep: every sample trains at that one timestep", unset=1000)
    # --- loss and noise (sd-scripts' names; see docs/training.md "Loss and noise") ------------------------------
    loss_type: str = flag("l2", "loss function: l2 (mean squared error), l1, huber or smooth_l1 (pseudo-Huber with "
                                "the --huber_* threshold)", choices=["l1", "l2", "huber", "smooth_l1"], type=str)
    huber_schedule: str = flag("snr", "how the Huber threshold follows the timestep: constant (huber_c * "
                                      "huber_scale), exponential (huber_scale at t=0 down to huber_c * huber_scale) "
                                      "or snr (from the noise level; SDXL only)",
                               choices=["constant", "exponential", "snr"], type=str)
    huber_c: float = flag(0.1, "Huber threshold c (or its lower end for the exponential and snr schedules)")
    huber_scale: float = flag(1.0, "multiplier of the Huber threshold (constant and exponential schedules)")
    masked_loss: bool = flag(False, "weight the loss by a mask: the red channel of the conditioning image "
                                    "(conditioning_data_dir), else the image's alpha mask (alpha_mask)")
    prior_loss_weight: float = flag(1.0, "loss weight of regularization images (is_reg subsets, --reg_data_dir); "
                                         "a dataset TOML's prior_loss_weight wins")
    debiased_estimation_loss: bool = flag(False, "weight the loss by 1/sqrt(SNR) (1/(SNR+1) with "
                                                 "--v_parameterization), debiased estimation (SDXL)")
    scale_v_pred_loss_like_noise_pred: bool = flag(False, "scale a v-prediction loss by SNR/(SNR+1), so that it "
                                                          "weighs timesteps like a noise-prediction loss (SDXL)")
    v_pred_like_loss: float | None = flag(None, "add this fraction of a v-prediction-like loss: the loss times "
                                                "(1 + v_pred_like_loss * (SNR+1)/SNR) (SDXL)")
    zero_terminal_snr: bool = flag(False, "rescale the noise schedule so that the last timestep is pure noise "
                                          "(zero SNR) (SDXL)")
    adaptive_noise_scale: float | None = flag(None, "add this times the absolute mean of each latent channel to "
                                                    "--noise_offset (needs --noise_offset)")
    noise_offset_random_strength: bool = flag(False, "draw the noise offset uniformly in [0, --noise_offset) per "
                                                     "sample")
    multires_noise_iterations: int | None = flag(None, "pyramid (multi-resolution) noise: levels added to the noise, "
                                                       "e.g. 6 to 10 (SDXL)")
    multires_noise_discount: float = flag(0.3, "pyramid noise: weight factor of each coarser level (e.g. 0.1 to 0.3)")
    ip_noise_gamma: float | None = flag(None, "input perturbation noise: extra noise of this strength in the noisy "
                                              "input only (not in the target), e.g. 0.1")
    ip_noise_gamma_random_strength: bool = flag(False, "draw the input perturbation strength uniformly in "
                                                       "[0, --ip_noise_gamma) per sample")
    sdpa: bool = flag(False, "use PyTorch SDPA attention (the default)")
    xformers: bool = flag(False, "use xformers attention (optional extra; without it: a warning, then SDPA)")
    mem_eff_attn: bool = flag(False, "memory-efficient attention: PyTorch SDPA is used, which is memory-efficient "
                                     "already (a warning says so)")
    sdpa_cudnn: bool = flag(False, "let training use cuDNN's SDPA kernel (off by default: its backward gave NaN "
                                   "gradients on Hopper GPUs, see library/train/attention.py)")
    torch_compile: bool = flag(False, "torch.compile the denoiser, block by block (library/train/compile.py); a "
                                      "backend that cannot compile here gives a warning and eager mode")
    dynamo_backend: str = flag("inductor", "torch.compile backend for --torch_compile (inductor: fused kernels; "
                                           "aot_eager: traced graphs with eager kernels, for debugging)",
                               choices=DYNAMO_BACKENDS)

    def __post_init__(self) -> None:
        lo, hi = self.min_timestep, self.max_timestep
        if lo is not None and hi is not None:
            if lo > hi:
                raise UserError(f"--min_timestep {lo} is above --max_timestep {hi}; give min <= max (equal values "
                                "train at that one timestep)")
            if lo == hi and hi >= 1000:
                raise UserError(f"--min_timestep = --max_timestep = {hi}: the training timesteps run from 0 to 999")
        if self.loss_type in ("huber", "smooth_l1") and self.huber_schedule == "exponential" and self.huber_c <= 0:
            raise UserError(f"--huber_c {self.huber_c}: the exponential Huber schedule needs a positive --huber_c")
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            warn_once([f"--adaptive_noise_scale {self.adaptive_noise_scale} without --noise_offset: not used (it "
                       "adjusts the noise offset, as in sd-scripts)"])
