#!/usr/bin/env bash
# GPU check of FLUX --fp8_base / --blocks_to_swap on the tiny model (run on a lent GPU, like run_gpu_checks.sh).
# Known result (H200, 2026-11-26): training losses NaN from step 2 with either flag; see docs/flux.md. Before
# rerunning, seed the LoRA identically across variants for the exactness comparison, and log step-1 gradients.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T=/tmp/lv
python3 - <<PY 2>&1 | grep -v Warn | tail -n 20 | tee "$OUT/unit.txt"
import copy, time, torch
from library.models.tiny_flux import save_tiny_flux, build_tiny_flux
from library.data.synthetic import make_shapes_dataset
save_tiny_flux("$T/m", "single_file", seed=0)
make_shapes_dataset("$T/img", 4, sizes=[(64, 64)], seed=0)
open("$T/ds.toml", "w").write("[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = '$T/img'\n")
from library.models.lowvram import BlockSwapper, apply_fp8_linear
from networks.lora_flux import create_network
m = build_tiny_flux(0)
def run(swap, fp8):
    tr = copy.deepcopy(m.transformer).requires_grad_(False).to("cuda", torch.bfloat16)
    if fp8: apply_fp8_linear(tr, torch.bfloat16)
    net = create_network(1.0, 4, 4.0, m.ae, [m.clip_l, m.t5], tr)
    net.apply_to([m.clip_l, m.t5], tr, apply_text_encoder=False, apply_unet=True); net.to("cuda")
    g = torch.Generator().manual_seed(5)
    for l in net.loras:
        with torch.no_grad(): l.lora_up.weight.copy_(torch.randn(l.lora_up.weight.shape, generator=g) * 0.1)
    tr.enable_gradient_checkpointing(); tr.train()
    sw = BlockSwapper.attach(tr, swap, "cuda", record=True) if swap else None
    g = torch.Generator().manual_seed(1); c = tr.config
    x = dict(hidden_states=torch.randn(2, 16, c.in_channels, generator=g), encoder_hidden_states=torch.randn(2, 8, c.joint_attention_dim, generator=g),
             pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g), timestep=torch.full((2,), .5), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.full((2,), 3.5))
    x = {k: v.cuda() for k, v in x.items()}
    with torch.autocast("cuda", torch.bfloat16):
        out = tr(**x).sample
    out.float().square().mean().backward()
    devs = sorted({str(p.device) for b in (sw.blocks if sw else []) for p in b.parameters()})
    return out.float().cpu(), [p.grad.float().cpu() for p in net.parameters() if p.requires_grad], sw, devs
o0, g0, _, _ = run(0, False)
for swap, fp8 in ((3, False), (0, True), (3, True)):
    o, gr, sw, devs = run(swap, fp8)
    ref_o, ref_g = (o0, g0) if not fp8 else run(0, True)[:2]
    print(f"swap={swap} fp8={fp8}: out equal to no-swap {torch.equal(o, ref_o)}, grads equal {all(torch.equal(a, b) for a, b in zip(gr, ref_g))}, "
          f"rel err vs bf16 {float((o - o0).norm() / o0.norm()):.4f}, swapped-block devices after step {devs}, events {sw.events if sw else None}")
PY
common="--pretrained_model_name_or_path $T/m --dataset_config $T/ds.toml --network_module networks.lora_flux --network_dim 4
 --network_alpha 4 --learning_rate 1e-3 --max_train_steps 3 --seed 1 --optimizer_type AdamW --t5xxl_max_token_length 16
 --timestep_sampling shift --model_prediction_type raw --guidance_scale 1.0 --mixed_precision bf16 --output_name lora"
for v in "gc:--gradient_checkpointing" "swap:--gradient_checkpointing --blocks_to_swap 1" "fp8:--fp8_base" "fp8swap:--fp8_base --gradient_checkpointing --blocks_to_swap 2" "swapnogc:--blocks_to_swap 1"; do
  n=${v%%:*}; f=${v#*:}
  python3 flux_train_network.py $common --output_dir $T/$n --loss_log_file "$OUT/loss_$n.jsonl" $f > $T/$n.log 2>&1
  echo "train $n rc=$? $(grep -ci 'traceback' $T/$n.log) tracebacks; $(tail -n 1 $T/$n.log | cut -c1-200)" | tee -a "$OUT/summary.txt"
done
for v in "plain:" "both:--fp8_base --blocks_to_swap 2"; do
  n=${v%%:*}; f=${v#*:}
  python3 flux_gen_img.py --ckpt $T/m --prompt "a red circle" --outdir $T/gen_$n --W 64 --H 64 --steps 3 --seed 3 --bf16 \
    --t5xxl_max_token_length 16 --network_module networks.lora_flux --network_weights $T/fp8swap/lora.safetensors $f > $T/gen_$n.log 2>&1
  echo "gen $n rc=$? $(ls $T/gen_$n 2>/dev/null | head -1); $(tail -n 1 $T/gen_$n.log | cut -c1-200)" | tee -a "$OUT/summary.txt"
done
python3 -c "
import glob, numpy as np; from PIL import Image
a, b = (np.asarray(Image.open(glob.glob('$T/gen_%s/*.png' % n)[0]), dtype=np.int16) for n in ('plain', 'both'))
print('gen plain vs fp8+swap: mean abs pixel diff', np.abs(a - b).mean(), 'max', np.abs(a - b).max())" 2>&1 | tail -n 2 | tee -a "$OUT/summary.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >> "$OUT/summary.txt"
