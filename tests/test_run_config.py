"""`--config_file` run TOMLs: read as dataset TOMLs are (BOM, bad bytes, syntax errors -> one clear error), keys that
are no flag warned about (or refused with --config_strict), flags declared once; and machine-only flags that warn
instead of stopping a run. Mostly through the trainer scripts, as users meet them."""
from __future__ import annotations

import argparse
import codecs

import pytest

from conftest import run_script, write_toml


def _run(tmp_path, content: bytes, *flags: str):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    return run_script("sdxl_train_network.py", "--config_file", str(path), *flags), str(path)


@pytest.mark.parametrize("content, expected", [
    (b'network_dim = 4\nnetwork_args = {conv_dim = 4\n', ["line 2", "TOML syntax error"]),  # unclosed inline table
    (b'network_dim = 4\ntraining_comment = "caf\xe9"\n', ["line 2", "not UTF-8"]),  # Latin-1 byte
    (b'network_dim = 4\n[x\n', ["line 2"]),
])
def test_unreadable_run_toml_is_one_error_with_file_and_line(tmp_path, content, expected):
    r, path = _run(tmp_path, content)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert path in r.stderr
    for e in expected:
        assert e in r.stderr


def test_utf8_bom_is_accepted(tmp_path):
    """With the BOM left in, the first key would be '\\ufeffpretrained_model_name_or_path': an unknown key that prints
    like the real one, and the run would stop at "--pretrained_model_name_or_path is required"."""
    model = tmp_path / "missing_model.safetensors"
    r, _ = _run(tmp_path, codecs.BOM_UTF8 + f'pretrained_model_name_or_path = "{model.as_posix()}"\n'
                                            f'dataset_config = "{(tmp_path / "d.toml").as_posix()}"\n'.encode())
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is required" not in r.stderr and "no flag" not in r.stderr
    assert "d.toml" in r.stderr or "missing_model" in r.stderr  # got past parsing to the files themselves


def test_gui_keys_are_one_warning_and_strict_mode_refuses_them(tmp_path):
    content = b'epoch = 10\nnoise_offset_type = "Original"\nnetwork_dimm = 4\n'
    r, path = _run(tmp_path, content)
    assert r.returncode == 1  # stops later, at the missing model: the keys themselves do not stop it
    warning = [line for line in r.stderr.splitlines() if "no flag of this script" in line]
    assert len(warning) == 1 and path in warning[0]
    assert "'epoch'" in warning[0] and "'noise_offset_type'" in warning[0]
    assert "did you mean 'network_dim'" in warning[0] and "--config_strict" in warning[0]
    assert "--pretrained_model_name_or_path is required" in r.stderr

    r, _ = _run(tmp_path, content, "--config_strict")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no flag of this script" in r.stderr and "is required" not in r.stderr
    r, _ = _run(tmp_path, b"config_strict = true\n" + content)
    assert r.returncode == 1 and "remove them" in r.stderr


def test_config_values_are_typed_by_the_flag_declarations(tmp_path):
    from library.config.run_config import parse_args_with_config
    from library.train.entry import build_script_parser
    import sdxl_train_network

    cfg = write_toml(tmp_path / "r.toml", '[a]\nlr_warmup_steps = 0.1\ntext_encoder_lr = 1e-5\n'
                                          '[b]\ndataset_config = "d.toml"\nsave_precision = "bf16"\n')
    args = parse_args_with_config(build_script_parser(None, sdxl_train_network.add_args), ["--config_file", cfg])
    assert args.lr_warmup_steps == 0.1 and args.text_encoder_lr == [1e-5]
    assert args.dataset_config == "d.toml" and args.save_precision == "bf16"
    args = parse_args_with_config(build_script_parser(None, sdxl_train_network.add_args),
                                  ["--config_file", cfg, "--lr_warmup_steps", "10"])
    assert args.lr_warmup_steps == 10 and isinstance(args.lr_warmup_steps, int)


def test_one_declaration_gives_parser_default_help_and_config(tmp_path):
    """A flag field gives the argparse option (sd-scripts' default), and the config value the run uses."""
    from dataclasses import dataclass

    from library.config.flags import add_flag_group, config_from_namespace, flag

    @dataclass
    class Example:
        """example"""

        name: str = flag("", "a name; empty means 'x'", unset="x")
        count: int = flag(3, "how many")
        rates: list[float] | None = flag(None, "one or more rates")
        on: bool = flag(False, "switch")

    p = argparse.ArgumentParser(allow_abbrev=False)
    add_flag_group(p, Example)
    assert p.parse_args([]).name == "" and config_from_namespace(Example, p.parse_args([])).name == "x"
    assert Example().name == "x"  # configs built in code behave like a plain command line
    cfg = config_from_namespace(Example, p.parse_args(["--name", "y", "--rates", "1", "2.5", "--on"]))
    assert (cfg.name, cfg.count, cfg.rates, cfg.on) == ("y", 3, [1.0, 2.5], True)
    assert "(unset: x)" in p.format_help() and "how many" in p.format_help()


def test_written_config_reads_back(tmp_path):
    from library.config.run_config import dumps_flat_toml
    from library.config.toml_read import read_toml

    data = {"a": 'quote " and \\ back', "b": 1e-4, "c": [1, 2], "d": True, "e": "caf\u00e9", "f": 3}
    (tmp_path / "w.toml").write_text(dumps_flat_toml(data), encoding="utf-8")
    assert read_toml(str(tmp_path / "w.toml")) == data


def test_machine_only_flags_warn_once_and_training_goes_on(tmp_path, tiny_sdxl_file, shapes_dataset):
    """A config from a GPU box trains on this CPU machine: each such flag is one warning, never a stop."""
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("checks the message when xformers is not installed")
    out = tmp_path / "out"
    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl_file,
                   "--dataset_config", shapes_dataset["config"], "--network_dim", "2", "--network_train_unet_only",
                   "--max_train_steps", "1", "--output_dir", str(out), "--output_name", "lora",
                   "--xformers", "--lowram", "--highvram", "--mem_eff_attn", "--save_model_as", "ckpt")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "lora.safetensors").is_file() and not list(out.glob("*.ckpt"))
    for flag_name in ("--xformers", "--lowram", "--highvram", "--mem_eff_attn", "--save_model_as ckpt"):
        assert r.stderr.count(flag_name + ":") + r.stderr.count(flag_name + " ") >= 1, flag_name
    assert r.stderr.count("--xformers:") == 1


def test_environment_warnings_are_said_once(capsys):
    from library.config.environment_flags import environment_warnings, warn_once

    messages = environment_warnings({"lowram": True, "highvram": True}, cuda=False)
    assert len(messages) == 2 and "no CUDA GPU" in messages[1]
    warn_once(messages + ["--test-only: once"])
    warn_once(["--test-only: once"])
    assert capsys.readouterr().err.count("--test-only: once") == 1


def test_console_log_flags_write_the_log_file(tmp_path):
    """--console_log_level / --console_log_file (sd-scripts' names): the file gets what the console shows."""
    (tmp_path / "train" / "notes").mkdir(parents=True)
    (tmp_path / "train" / "3_x").mkdir()
    log = tmp_path / "run.log"
    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", str(tmp_path / "none.safetensors"),
                   "--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--network_dim", "2",
                   "--output_dir", str(tmp_path / "out"), "--console_log_level", "INFO",
                   "--console_log_file", str(log), "--console_log_simple")
    assert r.returncode == 1 and "Traceback" not in r.stderr  # no model: stops after reading the dataset flags
    text = log.read_text(encoding="utf-8")
    assert "'notes' skipped" in text and "WARNING" in text


def test_flux_machine_flags_map_to_their_equivalents(capsys, monkeypatch):
    import flux_train_network
    import torch

    from library.config import environment_flags

    # warnings are said once per process: start from a process that has said none (other tests may have said these)
    monkeypatch.setattr(environment_flags, "_SAID", set())

    from library.config.flux_config import flux_model_config
    from library.train.entry import build_script_parser

    parser = build_script_parser(None, flux_train_network.add_args)
    cfg = flux_model_config(parser.parse_args(["--fp8_base_unet", "--split_mode", "--blocks_to_swap", "2"]))
    assert cfg.flux.fp8_base is True
    assert cfg.flux.blocks_to_swap == (2 if torch.cuda.is_available() else None)
    err = capsys.readouterr().err
    assert "--split_mode: retired" in err
    assert ("--blocks_to_swap 2: no CUDA GPU" in err) == (not torch.cuda.is_available())
