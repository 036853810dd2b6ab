"""Smoke test of bench/bench_lora_step.py: both variants run on the tiny U-Net and the JSON report is complete.

No timing assertions (the machine is shared); what is checked is that both variants trained the same problem.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from conftest import REPO, run_script

SCRIPT = "bench/bench_lora_step.py"


def _load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_lora_step", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_runs_both_variants(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = run_script(SCRIPT, "--model", "tiny", "--resolution", "64", "--batch_size", "1", "--rank", "4",
                      "--steps", "1", "--warmup", "0", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))

    assert {"date", "config", "machine", "results", "comparison"} <= set(report)
    assert report["config"]["model"] == "tiny" and report["config"]["rank"] == 4
    for name in ("ours", "peft"):
        r = report["results"][name]
        assert r["ran"] is True, r
        for key in ("lora_modules", "trainable_params", "median_step_s", "min_step_s", "step_times_s",
                    "peak_memory_mib", "losses", "weights_checksum", "default_target_params_ours"):
            assert key in r, (name, key)
        assert len(r["step_times_s"]) == 1 and len(r["losses"]) == 1
        assert r["median_step_s"] > 0 and r["peak_memory_mib"] > 0
        assert r["lora_modules"] > 0
    ours, peft = report["results"]["ours"], report["results"]["peft"]
    # same attention target set, rank 4: 4 * (in + out) per module on both sides
    assert ours["lora_modules"] == peft["lora_modules"]
    assert ours["trainable_params"] == peft["trainable_params"]
    assert ours["default_target_params_ours"] > ours["trainable_params"]  # default set adds ff and proj layers

    cmp = report["comparison"]
    assert cmp["same_base_weights"] is True and cmp["same_target_modules"] is True
    assert cmp["trainable_params_ours_over_peft"] == 1.0
    assert cmp["step_time_ours_over_peft"] > 0 and cmp["peak_memory_ours_over_peft"] > 0
    # both adapters start as an exact no-op on the same weights and batch: the first losses agree
    assert cmp["first_loss_abs_diff"] < 1e-5
    assert "ours/peft" in proc.stdout


def test_bad_resolution_is_one_clear_message(tmp_path: Path):
    proc = run_script(SCRIPT, "--model", "tiny", "--resolution", "100", "--json", str(tmp_path / "x.json"),
                      timeout=120)
    assert proc.returncode == 1
    assert "--resolution" in proc.stderr and "multiple of 64" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_compare_and_table_report_a_variant_that_did_not_run():
    bench = _load_bench_module()
    cfg = bench.BenchConfig("tiny", 64, 1, 4, 1, 0, False, "fp32", "cpu", 0, "attn")
    ran = {"variant": "ours", "ran": True, "lora_modules": 8, "trainable_params": 100, "median_step_s": 0.5,
           "peak_memory_mib": 10.0, "losses": [1.0], "weights_checksum": 1.0, "default_target_modules_ours": 12,
           "default_target_params_ours": 150}
    results = {"ours": ran, "peft": {"variant": "peft", "ran": False, "reason": "exit code -9 (killed)"}}
    assert bench.compare(results) == {}
    table = bench.format_table(cfg, results, {})
    assert "peft     not run: exit code -9" in table

    both = {"ours": ran, "peft": dict(ran, variant="peft", median_step_s=1.0, peak_memory_mib=20.0, losses=[1.5])}
    cmp = bench.compare(both)
    assert cmp["step_time_ours_over_peft"] == 0.5 and cmp["peak_memory_ours_over_peft"] == 0.5
    assert cmp["first_loss_abs_diff"] == 0.5
