"""Regenerate tests/data/loss_regression_*.json after an intended change of the training numerics.

    .venv/bin/python tests/regen_loss_regression.py
Review the diff of the JSON files before committing them: a changed loss is a changed trainer.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REGRESSION_CASES = {
    # name -> (script, number of steps, dataset key in the shapes fixture, extra run-config values)
    "loss_regression_sdxl_lora.json": ("sdxl_train_network.py", 4, "config", {}),
    "loss_regression_sdxl_lllite.json": ("sdxl_train_control_net_lllite.py", 4, "cn_config",
                                         {"network_module": "networks.control_net_lllite", "network_dim": 8,
                                          "cond_emb_dim": 8}),
}


def main() -> None:
    from conftest import run_script
    from test_train_sdxl_network import read_losses, run_toml

    from conftest import build_shapes_dataset
    from library.models.tiny import save_tiny_sdxl

    for name, (script, steps, ds_key, extra) in REGRESSION_CASES.items():
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            model = save_tiny_sdxl(str(tmp / "m.safetensors"), "single_file", seed=0)
            ds = build_shapes_dataset(tmp)
            cfg = run_toml(tmp, model, ds[ds_key], max_train_steps=steps, **extra)
            r = run_script(script, "--config_file", cfg)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            losses = read_losses(tmp / "run_loss.jsonl")
        out = Path(__file__).parent / "data" / name
        out.write_text(json.dumps({"script": script, "losses": losses}, indent=1) + "\n")
        print(f"wrote {out}: {losses}")


if __name__ == "__main__":
    main()
