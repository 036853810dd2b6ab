#!/usr/bin/env bash
# GPU checks, run on a lent GPU machine (see docs/benchmarks.md): the LoRA-step benchmark at 1024 px bf16, the step
# time / MFU benchmark (bench/bench_step_mfu.py; about 8 minutes on an H200) and CUDA training smoke runs of the LoRA
# and LLLite trainers on the tiny model. Wheels the GPU image lacks (diffusers, toml, pillow-heif) travel in .whl/.
# Results go to $OUT (default ./gpu_out).
set -euo pipefail
. bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# no host sync from our code on the training step (torch's sync debug mode; issue #18)
python3 -m pytest -q -s -p no:cacheprovider \
  tests/test_step_readback.py::test_no_synchronising_cuda_call_from_our_code_on_the_step 2>&1 | tail -n 12 || true
for gc in "" "--gradient_checkpointing"; do
  python3 bench/bench_lora_step.py --model sdxl-arch --resolution 1024 --batch_size 1 --rank 16 --steps 10 \
    --warmup 3 --dtype bf16 --device cuda $gc --json "$OUT/bench_bf16${gc:+_gc}.json" | tail -n 12
done
# issue #18: step time, images/s, peak memory and MFU per configuration, ours against diffusers + PEFT. SDXL at full
# size; FLUX.1's full 19 + 38 blocks need more than one H100's memory at batch 8 without checkpointing, so its run
# is capped by a timeout (a configuration that runs out of memory is reported as not run, the others still are).
python3 bench/bench_step_mfu.py --device cuda --families sdxl --batch_sizes 1,4,8 --gc off,on --steps 6 --warmup 3 \
  --variant_timeout 240 --json "$OUT/step_mfu_sdxl.json" | tail -n 16 || true
python3 bench/bench_step_mfu.py --device cuda --families flux --batch_sizes 1,4 --gc on --steps 4 --warmup 2 \
  --variant_timeout 300 --json "$OUT/step_mfu_flux.json" | tail -n 8 || true
python3 bench/bench_step_mfu.py --device cuda --families sdxl --batch_sizes 4 --gc off --variants ours \
  --torch_compile --variant_timeout 400 --json "$OUT/step_mfu_sdxl_compile.json" | tail -n 4 || true
T=/tmp/gpu_smoke
python3 tools/make_tiny_model.py --family sdxl --output $T/m.safetensors
python3 - <<PY
from library.data.synthetic import make_shapes_dataset
make_shapes_dataset("$T/img", 8, sizes=[(128, 128)], seed=0, conditioning_dir="$T/cond")
open("$T/ds.toml", "w").write("""[general]
caption_extension = '.txt'
[[datasets]]
resolution = 128
batch_size = 4
  [[datasets.subsets]]
  image_dir = '$T/img'
  conditioning_data_dir = '$T/cond'
""")
PY
common="--pretrained_model_name_or_path $T/m.safetensors --dataset_config $T/ds.toml --max_train_steps 30 --seed 0
  --mixed_precision bf16 --full_bf16 --gradient_checkpointing --cache_latents --cache_text_encoder_outputs
  --network_train_unet_only --learning_rate 3e-3"
python3 sdxl_train_network.py $common --output_dir $T/lora --network_dim 8 --network_alpha 8 \
  --network_args conv_dim=4 conv_alpha=4 --loss_log_file "$OUT/gpu_lora_loss.jsonl" 2>&1 | tail -n 3
python3 sdxl_train_control_net_lllite.py $common --output_dir $T/lllite --cond_emb_dim 16 --network_dim 16 \
  --loss_log_file "$OUT/gpu_lllite_loss.jsonl" 2>&1 | tail -n 3
python3 sdxl_gen_img.py --ckpt $T/m.safetensors --prompt "a red square" --outdir $T/gen --W 128 --H 128 --steps 4 \
  --bf16 --network_module networks.lora --network_weights $T/lora/last.safetensors --network_mul 1 \
  --images_per_prompt 2 2>&1 | tail -n 2
ls $T/gen | tee "$OUT/gen_files.txt"
