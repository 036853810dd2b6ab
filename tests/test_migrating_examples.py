"""docs/migrating.md's walk-throughs, run: a kohya_ss GUI run TOML and a fluxgym command line, unchanged except for
the paths (and the sizes, for the tiny models)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import run_script, write_toml
from library.data.synthetic import make_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# A run TOML as the kohya_ss GUI writes it (its own keys `epoch`, `noise_offset_type` included). Only the paths,
# the resolution / bucket sizes and max_train_steps differ from a real one (docs/migrating.md shows the same file).
GUI_TOML = """\
bucket_no_upscale = true
bucket_reso_steps = 32
cache_latents = true
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
epoch = 8
gradient_accumulation_steps = 1
gradient_checkpointing = true
huber_c = 0.1
huber_schedule = "snr"
huggingface_repo_id = ""
huggingface_token = ""
learning_rate = 0.00004
loss_type = "l2"
lr_scheduler = "constant"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
max_bucket_reso = 128
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_steps = 2
min_bucket_reso = 32
min_snr_gamma = 5
mixed_precision = "bf16"
network_alpha = 16
network_args = []
network_dim = 32
network_module = "networks.lora"
no_half_vae = true
noise_offset_type = "Original"
optimizer_args = []
optimizer_type = "AdamW8Bit"
output_dir = "{out}"
output_name = "last"
pretrained_model_name_or_path = "{model}"
prior_loss_weight = 1
resolution = "64,64"
sample_prompts = ""
sample_sampler = "euler_a"
save_every_n_epochs = 2
save_model_as = "safetensors"
save_precision = "bf16"
scale_weight_norms = 5
text_encoder_lr = 0.00004
train_batch_size = 2
train_data_dir = "{train}"
training_comment = ""
unet_lr = 0.00004
xformers = true
"""


def dog_folder(root: Path) -> Path:
    train = root / "img"
    make_shapes_dataset(str(train / "10_sks dog"), 2, sizes=[(64, 64), (96, 64)], seed=0)
    return train


def test_kohya_ss_gui_toml_runs_unchanged(tmp_path, tiny_sdxl_file):
    train = dog_folder(tmp_path)
    cfg = write_toml(tmp_path / "config_lora.toml", GUI_TOML.format(out=tmp_path / "out", model=tiny_sdxl_file,
                                                                      train=train))
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'epoch'" in r.stderr and "'noise_offset_type'" in r.stderr  # the GUI's own keys: one warning
    out = tmp_path / "out" / "last.safetensors"
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
        rank = f.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight").shape[0]
    assert rank == 32 and float(md["ss_network_alpha"]) == 16 and float(md["ss_min_snr_gamma"]) == 5
    assert md["ss_dataset_dirs"] == '{"10_sks dog": {"n_repeats": 10, "img_count": 2}}'


def test_fluxgym_command_line_runs_with_the_t5_tokenizer_given(tmp_path, tiny_flux_single):
    """fluxgym's train.sh (its 12G preset) with the file layout it downloads; the additions are where the T5
    tokenizer is (sd-scripts downloads it from the Hub) and, for now, --network_train_unet_only."""
    single = Path(tiny_flux_single)
    models = tmp_path / "models"
    for src, dst in (("flux.safetensors", "unet/flux1-dev.sft"), ("ae.safetensors", "vae/ae.sft"),
                     ("clip_l.safetensors", "clip/clip_l.safetensors"),
                     ("t5xxl.safetensors", "clip/t5xxl_fp16.safetensors")):
        (models / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(single / src, models / dst)
    shutil.copytree(single / "tokenizer_2", tmp_path / "tokenizers" / "tokenizer_2")
    data = tmp_path / "datasets" / "my-lora"
    make_shapes_dataset(str(data), 2, sizes=[(64, 64)], seed=0)
    out = tmp_path / "outputs" / "my-lora"
    out.mkdir(parents=True)
    dataset = write_toml(out / "dataset.toml", f"""[general]
shuffle_caption = false
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 1
keep_tokens = 1

  [[datasets.subsets]]
  image_dir = '{data}'
  class_tokens = 'my trigger'
  num_repeats = 1""")
    r = run_script(
        "flux_train_network.py",
        "--pretrained_model_name_or_path", str(models / "unet/flux1-dev.sft"),
        "--clip_l", str(models / "clip/clip_l.safetensors"), "--t5xxl", str(models / "clip/t5xxl_fp16.safetensors"),
        "--ae", str(models / "vae/ae.sft"), "--cache_latents_to_disk", "--save_model_as", "safetensors",
        "--sdpa", "--persistent_data_loader_workers", "--max_data_loader_n_workers", "2", "--seed", "42",
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--save_precision", "bf16",
        "--network_module", "networks.lora_flux", "--network_dim", "4", "--optimizer_type", "adafactor",
        "--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False", "--split_mode",
        "--network_args", "train_blocks=single", "--lr_scheduler", "constant_with_warmup", "--max_grad_norm", "0.0",
        "--learning_rate", "8e-4", "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",
        "--fp8_base", "--highvram", "--max_train_epochs", "1", "--save_every_n_epochs", "4",
        "--dataset_config", dataset, "--output_dir", str(out), "--output_name", "my-lora",
        "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
        "--guidance_scale", "1", "--loss_type", "l2",
        "--tokenizer_cache_dir", str(tmp_path / "tokenizers"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--split_mode" in r.stderr and "--highvram" in r.stderr  # each answered with one warning
    with safe_open(str(out / "my-lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        md = f.metadata()
        te1_ups = [f.get_tensor(k) for k in keys if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    # train_blocks=single; CLIP-L is trained too (T5's outputs are cached, CLIP-L runs every step, as in sd-scripts)
    assert all(k.startswith(("lora_unet_single_blocks_", "lora_te1_")) for k in keys)
    assert any(k.startswith("lora_unet_single_blocks_") for k in keys)
    assert te1_ups and any(float(t.abs().max()) > 0 for t in te1_ups)  # the CLIP-L LoRA trained
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_discrete_flow_shift"] == "3.1582"
