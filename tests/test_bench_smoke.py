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


# --- bench/bench_step_mfu.py ----------------------------------------------------------------------------------------

MFU_SCRIPT = "bench/bench_step_mfu.py"


def _load_mfu_module():
    spec = importlib.util.spec_from_file_location("bench_step_mfu", REPO / MFU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_step_mfu_tiny_cpu_runs_every_family_and_variant(tmp_path: Path):
    out = tmp_path / "mfu.json"
    proc = run_script(MFU_SCRIPT, "--tiny", "--device", "cpu", "--batch_sizes", "2", "--gc", "on",
                      "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = report["rows"]
    assert {(r["family"], r["variant"]) for r in rows} == {("sdxl", "ours"), ("sdxl", "peft"), ("flux", "ours"),
                                                           ("flux", "peft")}
    for r in rows:
        assert r["ran"] is True, r
        assert r["batch_size"] == 2 and r["gc"] is True
        assert r["flops_per_step"] > 0 and r["median_step_s"] > 0
        assert r["images_per_s"] == 2 / r["median_step_s"]
        assert r["mfu"] is None  # no MFU on a CPU (no peak in the table)
        assert len(r["losses"]) == 2 and r["trainable_params"] > 0
    by = {(r["family"], r["variant"]): r for r in rows}
    # both adapters start as an exact no-op on the same weights and inputs: the first losses agree
    for family in ("sdxl", "flux"):
        assert by[(family, "ours")]["first_loss_abs_diff"] < 1e-5, family
        assert by[(family, "ours")]["time_vs_peft"] > 0
    # same attention targets on SDXL: same trainable parameters and FLOPs
    assert by[("sdxl", "ours")]["trainable_params"] == by[("sdxl", "peft")]["trainable_params"]
    assert by[("sdxl", "ours")]["flops_per_step"] == by[("sdxl", "peft")]["flops_per_step"]
    assert "GFLOP/step" in proc.stdout and "MFU" in proc.stdout


def test_step_mfu_profile_writes_a_trace_and_the_top_ops(tmp_path: Path):
    """--profile: one more step per variant under torch.profiler; a gzipped Chrome trace and the costliest ops."""
    import gzip

    out, traces = tmp_path / "mfu.json", tmp_path / "traces"
    proc = run_script(MFU_SCRIPT, "--tiny", "--device", "cpu", "--families", "sdxl", "--batch_sizes", "1",
                      "--gc", "off", "--variants", "ours", "--profile", str(traces), "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text(encoding="utf-8"))["rows"]
    prof = row["profile"]
    assert Path(prof["trace"]) == traces / "sdxl_64px_b1_gcoff_ours.trace.json.gz"
    with gzip.open(prof["trace"], "rt", encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)  # the LoRA's and the U-Net's matrix products
    assert prof["time_source"] == "host" and 0 < len(prof["top"]) <= 15
    shares = [t["share"] for t in prof["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert len(row["step_times_s"]) == 2  # the profiled step is not one of the timed ones


def test_flop_counting_matches_hand_computed_linear_and_conv():
    import torch

    bench = _load_mfu_module()
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    xg = torch.randn(2, 8, requires_grad=True)
    # forward: 2 FLOPs per multiply-add, batch x in x out of them; the backward: as much again for the weight's
    # gradient, and again for the input's when the input needs one
    assert bench.count_flops(lambda: linear(x)) == 2 * 2 * 8 * 4 == 128
    assert bench.count_flops(lambda: linear(x).sum().backward()) == 2 * 128
    assert bench.count_flops(lambda: linear(xg).sum().backward()) == 3 * 128
    linear.requires_grad_(False)  # frozen, as a LoRA's base layer: only the input's gradient
    assert bench.count_flops(lambda: linear(xg).sum().backward()) == 2 * 128

    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)
    img = torch.randn(1, 3, 8, 8)
    # each of the 5 x 8 x 8 outputs is a 3 x 3 x 3 dot product: 2 FLOPs per multiply-add
    assert bench.count_flops(lambda: conv(img)) == 2 * (5 * 8 * 8) * (3 * 3 * 3)
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(5 * 8 * 8, 10))
    assert bench.count_flops(lambda: model(img)) == 2 * 320 * 27 + 2 * 320 * 10


def test_mfu_and_device_peaks():
    bench = _load_mfu_module()
    assert bench.peak_tflops("NVIDIA H200") == 989.0 and bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert bench.peak_tflops("Some Future Chip") is None and bench.peak_tflops(None) is None
    # 20 TFLOP in 0.338 s on a 989 TFLOP/s device: about 6 % (the figure)
    assert abs(bench.mfu(20e12, 0.338, 989.0) - 0.0598) < 1e-3
    assert bench.mfu(None, 0.3, 989.0) is None and bench.mfu(1e12, 0.3, None) is None


def test_step_mfu_bad_arguments_are_one_message(tmp_path: Path):
    proc = run_script(MFU_SCRIPT, "--tiny", "--device", "cpu", "--families", "sd3", timeout=120)
    assert proc.returncode == 1 and "--families" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script(MFU_SCRIPT, "--tiny", "--device", "cpu", "--resolution", "100", timeout=120)
    assert proc.returncode == 1 and "--resolution" in proc.stderr and "Traceback" not in proc.stderr
