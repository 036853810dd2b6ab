"""Scaling of the shared training loop: 1 process vs N processes (torchrun; gloo on CPU, NCCL on GPUs).

    python bench/bench_multiprocess.py [--nproc 2] [--steps 20] [--batch_size 2] [--resolution 64] [--json out.json]

Both runs train the tiny SDXL LoRA with the same per-device batch; throughput is samples per second over the steps
after the first 3 (from the trainer's per-step loss log timestamps). Scaling efficiency = throughput(N) /
(N x throughput(1)). On a 2-core CPU the processes share the cores, so the number measures overhead, not speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _throughput(loss_log: Path, global_batch: int, skip: int = 3) -> float:
    times = [json.loads(line)["time"] for line in loss_log.read_text().splitlines()]
    if len(times) <= skip + 1:
        raise SystemExit("too few steps to time: raise --steps")
    return global_batch * (len(times) - 1 - skip) / (times[-1] - times[skip])


def _free_port() -> int:
    """A port nobody listens on now: a fixed one fails the run whenever something else on the machine holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(work: Path, nproc: int, args: argparse.Namespace, model: str, images: str) -> float:
    ds = work / f"ds_{nproc}.toml"
    ds.write_text(f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = {args.resolution}\n"
                  f"batch_size = {args.batch_size}\n  [[datasets.subsets]]\n  image_dir = '{images}'\n")
    log = work / f"loss_{nproc}.jsonl"
    flags = ["--pretrained_model_name_or_path", model, "--dataset_config", str(ds), "--output_dir",
             str(work / f"out_{nproc}"), "--network_dim", "8", "--max_train_steps", str(args.steps),
             "--network_train_unet_only", "--cache_latents", "--loss_log_file", str(log)]
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "sdxl_train_network.py"), *flags]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or nproc) // nproc))
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), str(REPO / "sdxl_train_network.py"), *flags]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{nproc}-process run failed:\n{r.stderr[-3000:]}")
    return _throughput(log, args.batch_size * nproc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=2, help="per device")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from library.data.synthetic import make_shapes_dataset
    from library.models.tiny import save_tiny_sdxl

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model = save_tiny_sdxl(str(work / "m.safetensors"), "single_file", seed=0)
        images = str(work / "img")
        make_shapes_dataset(images, 4 * args.batch_size * args.nproc, sizes=[(args.resolution, args.resolution)])
        one = _run(work, 1, args, model, images)
        many = _run(work, args.nproc, args, model, images)
    result = {"nproc": args.nproc, "per_device_batch": args.batch_size, "resolution": args.resolution,
              "steps": args.steps, "samples_per_s_1": one, f"samples_per_s_{args.nproc}": many,
              "scaling_efficiency": many / (args.nproc * one), "load_average": os.getloadavg()[0]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
