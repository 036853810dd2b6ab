"""The README's demo command, shortened: tiny model + generated dataset -> LoRA -> images, end to end."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_demo_runs_end_to_end(tmp_path):
    from library.prompts.png_metadata import read_png_info

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "library.demo", "--output_dir", str(out), "--steps", "2",
                        "--num_images", "4", "--gen_steps", "2", "--images_per_prompt", "1"],
                       cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demo finished" in r.stdout
    assert (out / "lora" / "demo_lora.safetensors").is_file()
    assert list((out / "lora" / "sample").glob("*.png"))
    for name in ("base", "with_lora"):
        pngs = list((out / "generated" / name).glob("*.png"))
        assert len(pngs) == 1
        assert read_png_info(pngs[0]).prompt.startswith("a ")
    assert list((out / "logs").rglob("events.out.tfevents.*"))
