"""No work lost on a late error, and no late error that could have been found before step 1 (issue #19).

Driven as users drive the trainer: sdxl_train_network.py in a subprocess on the tiny model. Problems that can be
found before training (a broken image, a bad prompt line, an unwritable output folder, an output name that escapes
the folder) must stop the run before step 1 with one message; an error after step 1, or a SIGTERM, must save the
`-interrupted` network and a state that --resume continues from.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, free_port, run_script
from test_train_sdxl_network import read_losses, run_toml

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = "sdxl_train_network.py"


def refused_before_step_1(r: subprocess.CompletedProcess, tmp_path: Path, name: str = "run") -> str:
    """The run failed with one clear message, without a traceback and without training a step."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    log = tmp_path / f"{name}_loss.jsonl"
    assert not log.exists() or log.read_text() == "", "a step ran before the problem was reported"
    assert not list(tmp_path.rglob("*.safetensors")), "nothing may be saved before step 1"
    return r.stderr


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def cut_in_scan(jpeg: bytes) -> bytes:
    """A JPEG cut short inside its compressed pixel data (an interrupted download): every header segment, up to the
    start of scan (FF DA), is intact, so it opens and reports its size; only decoding the pixels fails."""
    sos = jpeg.find(b"\xff\xda")
    assert sos > 0
    return jpeg[: sos + (len(jpeg) - sos) // 2]


def jpeg_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ refused before step 1


def test_unreadable_images_are_all_listed_before_step_1(tmp_path, tiny_sdxl_file, shapes_dataset):
    images = sorted(Path(shapes_dataset["image_dir"]).glob("*.png"))
    cut_png = images[1]
    cut_png.write_bytes(truncated(png_bytes(cut_png)))  # the header is intact: only the checksums tell
    not_an_image = images[2].with_suffix(".jpg")
    not_an_image.write_bytes(b"this is not a JPEG")  # keeps its caption file, img_0002.txt
    images[2].unlink()
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"])
    err = refused_before_step_1(run_script(SCRIPT, "--config_file", cfg), tmp_path)
    assert str(cut_png) in err and str(not_an_image) in err, err
    assert "2 image(s) cannot be read" in err
    assert str(images[0]) not in err


def test_malformed_sample_prompt_names_file_and_line(tmp_path, tiny_sdxl_file, shapes_dataset):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na red square --w 64 --h 64\na blue circle --w abc\n", encoding="utf-8")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], sample_prompts=str(prompts),
                   sample_every_n_steps=100)
    err = refused_before_step_1(run_script(SCRIPT, "--config_file", cfg), tmp_path)
    assert str(prompts) in err and "line 3" in err, err
    assert "abc" in err and "--w" in err


def test_missing_control_image_in_sample_prompts_is_found_before_step_1(tmp_path, tiny_sdxl_file, shapes_dataset):
    prompts = tmp_path / "prompts.txt"
    missing = tmp_path / "no_such_guide.png"
    prompts.write_text(f"a red square --w 64 --h 64 --cn {missing}\n", encoding="utf-8")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], sample_prompts=str(prompts),
                   sample_every_n_steps=100)
    err = refused_before_step_1(run_script(SCRIPT, "--config_file", cfg), tmp_path)
    assert f"{prompts} line 1" in err and str(missing) in err, err


def _unwritable_output_dir(tmp_path: Path, how: str) -> Path:
    if how == "a file in the way":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where a folder should be", encoding="utf-8")
        return blocker / "out"
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except PermissionError:
        return folder
    (folder / "probe").unlink()
    folder.chmod(0o755)
    pytest.skip("this user (root) can write to a read-only folder")


@pytest.mark.parametrize("how", ["read-only", "a file in the way"])
def test_unwritable_output_dir_is_refused_before_step_1(tmp_path, tiny_sdxl_file, shapes_dataset, how):
    out = _unwritable_output_dir(tmp_path, how)
    try:
        cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], output_dir=str(out))
        err = refused_before_step_1(run_script(SCRIPT, "--config_file", cfg), tmp_path)
    finally:
        if how == "read-only":
            out.chmod(0o755)
    assert f"--output_dir {out}" in err and "cannot be written" in err, err


@pytest.mark.parametrize("name", ["../x", "sub/x", "ABS"])
def test_output_name_must_stay_in_output_dir(tmp_path, tiny_sdxl_file, shapes_dataset, name):
    if name == "ABS":
        name = str(tmp_path / "elsewhere" / "x")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], output_dir=str(tmp_path / "a" / "out"),
                   output_name=name)
    err = refused_before_step_1(run_script(SCRIPT, "--config_file", cfg), tmp_path)
    assert "--output_name" in err and "not a plain file name" in err, err
    assert not (tmp_path / "a" / "x.safetensors").exists() and not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------------------------------ saved after step 1


def first_batch_paths(dataset_config: str, seed: int, processes: int = 1) -> set[str]:
    """The images of the first (global) batch of epoch 0, found by the code the trainer uses to order them."""
    from dataclasses import replace

    from library.config.dataset_schema import load_dataset_config
    from library.data.dataset import TrainDataset
    from library.data.sources import collect_records
    from library.train.epoch_plan import plan_epoch

    group = load_dataset_config(dataset_config)
    datasets = [TrainDataset(replace(d, batch_size=d.batch_size * processes), collect_records(d, group.source), seed)
                for d in group.datasets]
    first = plan_epoch(datasets, 0, seed)[0]
    return {datasets[first.dataset_index].items[i].record.path for i in first.item_indices}


def cut_a_jpeg_after_the_first_batch(dataset: dict, seed: int, processes: int = 1) -> tuple[Path, bytes]:
    """Turn one image that the first batch does not use into a JPEG cut short after its header: it opens and
    passes the header check, and fails only when its pixels are decoded, mid-epoch. Returns it and its good bytes."""
    for png in sorted(Path(dataset["image_dir"]).glob("*.png")):
        good = jpeg_bytes(png)
        jpg = png.with_suffix(".jpg")
        jpg.write_bytes(cut_in_scan(good))
        png_data = png.read_bytes()
        png.unlink()
        if str(jpg) not in first_batch_paths(dataset["config"], seed, processes):
            return jpg, good
        jpg.unlink()
        png.write_bytes(png_data)
    raise AssertionError("every image is in the first batch")


def assert_interrupted_files(out: Path, min_step: int = 1) -> Path:
    weights = out / "lora-interrupted.safetensors"
    state = out / "lora-interrupted-state"
    assert weights.is_file(), sorted(p.name for p in out.iterdir())
    assert any(k.endswith("lora_down.weight") for k in load_file(str(weights)))
    loop_state = json.loads((state / "loop_state.json").read_text())
    assert loop_state["global_step"] >= min_step
    return state


def resume_runs(tmp_path: Path, model: str, dataset_config: str, state: Path, extra_steps: int = 1) -> None:
    """The saved state continues: --resume counts on from its step."""
    step = json.loads((state / "loop_state.json").read_text())["global_step"]
    cfg = run_toml(tmp_path, model, dataset_config, name="resumed", output_dir=str(tmp_path / "resumed"),
                   network_train_unet_only=True, resume=str(state), max_train_steps=step + extra_steps)
    r = run_script(SCRIPT, "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {state} at step {step}" in r.stdout + r.stderr
    assert len(read_losses(tmp_path / "resumed_loss.jsonl")) == extra_steps


def test_image_failing_mid_epoch_saves_then_reports(tmp_path, tiny_sdxl_file, shapes_dataset):
    bad, good = cut_a_jpeg_after_the_first_batch(shapes_dataset, seed=1)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=20,
                   network_train_unet_only=True)
    r = run_script(SCRIPT, "--config_file", cfg)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr
    assert f"error: {bad}: " in err, err[-3000:]  # the image loader's own message, unchanged
    assert "saved the network as of step" in err and "--resume" in err, err[-3000:]
    # the save comes before the error message
    assert err.index("saved the network") < err.index(f"error: {bad}")
    steps_done = len(read_losses(tmp_path / "run_loss.jsonl"))
    assert steps_done >= 1
    state = assert_interrupted_files(tmp_path / "out")
    assert json.loads((state / "loop_state.json").read_text())["global_step"] == steps_done
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    bad.write_bytes(good)  # the user fixes the image and continues
    resume_runs(tmp_path, tiny_sdxl_file, shapes_dataset["config"], state)


def test_sigterm_saves_and_exits_143(tmp_path, tiny_sdxl_file, shapes_dataset):
    log = tmp_path / "run_loss.jsonl"
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=100000,
                   network_train_unet_only=True)
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc, err = _sigterm_after_first_step([sys.executable, str(REPO / SCRIPT), "--config_file", cfg], tmp_path, env,
                                          log)
    assert proc.returncode == 143, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert "stopped by SIGTERM at step" in err, err[-3000:]
    state = assert_interrupted_files(tmp_path / "out")
    # stopped between steps: the state is at the last logged step
    assert json.loads((state / "loop_state.json").read_text())["global_step"] == len(read_losses(log))
    resume_runs(tmp_path, tiny_sdxl_file, shapes_dataset["config"], state)


def test_unwritable_output_at_the_rescue_falls_back_to_a_rescue_folder(tmp_path, tiny_sdxl_file, shapes_dataset,
                                                                       monkeypatch):
    """The output folder is gone (replaced by a file) when an unexpected error stops the run: the network and state
    go to a rescue folder in the current directory, and the error keeps its traceback (it is raised after)."""
    import shutil

    import sdxl_train_network
    from library.train import loop

    out = tmp_path / "out"
    calls = {"n": 0}
    original = loop.Trainer._load

    def fail_on_third(self, pb, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            shutil.rmtree(out, ignore_errors=True)
            out.write_text("not a folder any more", encoding="utf-8")
            raise RuntimeError("simulated failure")
        return original(self, pb, indices)

    monkeypatch.setattr(loop.Trainer, "_load", fail_on_third)
    monkeypatch.chdir(tmp_path)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=10,
                   network_train_unet_only=True)
    with pytest.raises(RuntimeError, match="simulated failure"):
        sdxl_train_network.main(["--config_file", cfg])
    rescued = sorted(tmp_path.glob("difftune-rescue-lora-*"))
    assert len(rescued) == 1, sorted(p.name for p in tmp_path.iterdir())
    state = assert_interrupted_files(rescued[0], min_step=2)
    assert json.loads((state / "loop_state.json").read_text())["global_step"] == 2


def test_progress_bar_says_when_it_samples(monkeypatch):
    """Sampling can take minutes between two steps: the bar says so, and says "steps" again afterwards."""
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from library.train import loop, sampling
    from library.train.prefetch import Prefetcher

    seen = []
    bar = tqdm(total=3, desc="steps", disable=False, file=io.StringIO())
    monkeypatch.setattr(sampling, "sample_during_training", lambda *a, **k: seen.append(bar.desc))
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.s = SimpleNamespace(cfg=SimpleNamespace(sample=SimpleNamespace(sample_prompts="p.txt")), sharded=False,
                                accelerator=SimpleNamespace(is_main_process=True))
    trainer.state = SimpleNamespace(global_step=1)
    trainer._bar = bar
    trainer._prefetch = Prefetcher(enabled=False)
    monkeypatch.setattr(loop.Trainer, "_read_losses", lambda self: None)  # no losses pending in this stand-in
    trainer.sample()
    assert seen and seen[0].startswith("sampling"), seen
    assert bar.desc == "steps"
    bar.close()


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_error_on_one_of_two_processes_saves_the_network_without_hanging(tmp_path, tiny_sdxl_file, shapes_dataset):
    """An image failing on one process only: no collective save (it could hang), the main process writes the
    network alone, the run ends non-zero within the timeout."""
    config = Path(shapes_dataset["config"])  # one image per process: a global batch of 2, two batches an epoch
    config.write_text(config.read_text().replace("batch_size = 2", "batch_size = 1"), encoding="utf-8")
    cut_a_jpeg_after_the_first_batch(shapes_dataset, seed=1, processes=2)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=20,
                   network_train_unet_only=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / SCRIPT),
                        "--config_file", cfg], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0
    assert len(read_losses(tmp_path / "run_loss.jsonl")) >= 1, r.stderr[-4000:]
    weights = tmp_path / "out" / "lora-interrupted.safetensors"
    assert weights.is_file(), r.stderr[-4000:]
    assert any(k.endswith("lora_down.weight") for k in load_file(str(weights)))
    assert not (tmp_path / "out" / "lora-interrupted-state").exists()
    assert "the state was not saved" in r.stderr, r.stderr[-4000:]


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_sigterm_to_torchrun_saves_weights_and_state_from_both_processes(tmp_path, tiny_sdxl_file, shapes_dataset):
    """torchrun forwards SIGTERM to every process; they agree on one step and save together (each its RNG state)."""
    log = tmp_path / "run_loss.jsonl"
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=100000,
                   network_train_unet_only=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    proc, err = _sigterm_after_first_step([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                                           "--shutdown_timeout", "300", str(REPO / SCRIPT), "--config_file", cfg],
                                          tmp_path, env, log)
    assert proc.returncode != 0
    assert "stopped by SIGTERM at step" in err, err[-4000:]
    state = assert_interrupted_files(tmp_path / "out")
    loop_state = json.loads((state / "loop_state.json").read_text())
    assert loop_state["num_processes"] == 2 and loop_state["global_step"] == len(read_losses(log))
    assert (state / "rng-0.json").is_file() and (state / "rng-1.json").is_file(), sorted(os.listdir(state))


def _sigterm_after_first_step(cmd: list[str], tmp_path, env: dict[str, str], log) -> tuple[subprocess.Popen, str]:
    """Start a training command, send SIGTERM once its loss log shows a step, wait for it to end; return the process
    and its stderr (written to files: a pipe could fill up)."""
    err_file = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as out, open(err_file, "w") as errs:
        proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=out, stderr=errs, text=True)
        try:
            deadline = time.monotonic() + 600
            while not (log.exists() and log.read_text().strip()):
                assert proc.poll() is None, err_file.read_text()[-3000:]
                assert time.monotonic() < deadline, "no step within 10 minutes"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc, err_file.read_text()
