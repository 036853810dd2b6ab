"""sd-scripts dataset keys that used to be parsed and ignored (issue #15): caption wildcards, a secondary separator,
token warm-up, resize filters, debug_dataset, dataset_class, max_validation_steps, and their flags."""
from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import run_script, write_toml
from library.config.dataset_schema import load_dataset_config
from library.config.dataset_source import dataset_fallbacks
from library.data.captions import caption_ops_active, process_caption, warmup_steps
from library.data.images import resize_image
from library.data.types import SubsetConfig
from library.errors import ConfigError
from test_train_sdxl_network import run_toml


def subset(**kw) -> SubsetConfig:
    return SubsetConfig(table="t", **kw)


# ---- captions ------------------------------------------------------------------------------------------------------

def test_wildcards_pick_each_choice_and_keep_escaped_braces():
    sub = subset(enable_wildcard=True)
    seen = {process_caption("a {red|blue} car, {{x}}", sub, random.Random(i), 0) for i in range(60)}
    assert seen == {"a red car, {x}", "a blue car, {x}"}
    assert caption_ops_active(sub)


def test_wildcard_picks_one_line_of_a_multiline_caption_and_without_it_the_first_line_is_used():
    lines = "first line\nsecond line\nthird line"
    seen = {process_caption(lines, subset(enable_wildcard=True), random.Random(i), 0) for i in range(60)}
    assert seen == {"first line", "second line", "third line"}
    assert process_caption(lines, subset(), random.Random(0), 0) == "first line"
    assert process_caption("{a|b}", subset(), random.Random(0), 0) == "{a|b}"  # off: left as written


def test_secondary_separator_keeps_tags_together_then_becomes_the_separator():
    sub = subset(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(20):
        out = process_caption("sks;;;dog, red, blue, green", sub, random.Random(seed), 0)
        tags = out.split(", ")
        assert "sks,dog" in tags, out  # moved as one tag, then joined with caption_separator
        assert sorted(tags) == sorted(["sks,dog", "red", "blue", "green"])
    # also without shuffling
    assert process_caption("a;;;b, c", subset(secondary_separator=";;;"), random.Random(0), 0) == "a,b, c"


def test_token_warmup_grows_the_free_tags_from_min_to_all():
    sub = subset(token_warmup_min=1, token_warmup_step=4, keep_tokens=1)
    caption = "sks, a, b, c, d"
    counts = [len(process_caption(caption, sub, random.Random(0), 0, step=s, max_train_steps=10).split(", "))
              for s in range(6)]
    # kept tag + floor(step * (4 - 1) / 4) + 1 free tags, all from step 4 on
    assert counts == [2, 2, 3, 4, 5, 5]
    assert process_caption(caption, sub, random.Random(0), 0, step=0).startswith("sks, a")  # order kept, no shuffle


def test_token_warmup_below_one_is_a_fraction_of_the_run():
    assert warmup_steps(subset(token_warmup_step=0.5), 10) == 5
    assert warmup_steps(subset(token_warmup_step=3), 10) == 3
    assert warmup_steps(subset(token_warmup_step=0), 10) == 0


# ---- resize filters --------------------------------------------------------------------------------------------------

def test_resize_interpolation_names_the_filter():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    nearest = resize_image(arr, (32, 32), "nearest")
    assert np.array_equal(nearest[::2, ::2], arr)  # nearest repeats pixels exactly
    assert not np.array_equal(resize_image(arr, (32, 32)), nearest)  # default: Lanczos


# ---- config keys and flags -------------------------------------------------------------------------------------------

def dataset_toml(tmp_path: Path, body: str) -> str:
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    return write_toml(tmp_path / "d.toml", f"""
[general]
resolution = 64
{body}
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{img}'
""")


def test_new_keys_reach_the_subset_and_dataset(tmp_path):
    cfg = dataset_toml(tmp_path, """
secondary_separator = ";;;"
enable_wildcard = true
token_warmup_min = 2
token_warmup_step = 0.25
face_crop_aug_range = [2.0, 4.0]
resize_interpolation = "bicubic"
network_multiplier = 0.5
custom_attributes = { style = "ink" }
""")
    d = load_dataset_config(cfg).datasets[0]
    s = d.subsets[0]
    assert (s.secondary_separator, s.enable_wildcard, s.token_warmup_min, s.token_warmup_step) == (";;;", True, 2, 0.25)
    assert s.face_crop_aug_range == [2.0, 4.0] and s.resize_interpolation == "bicubic"
    assert s.custom_attributes == {"style": "ink"} and d.network_multiplier == 0.5


@pytest.mark.parametrize("body, key", [('resize_interpolation = "sinc"', "resize_interpolation"),
                                       ("face_crop_aug_range = 2.0", "face_crop_aug_range"),
                                       ("token_warmup_min = -1", "token_warmup_min")])
def test_bad_values_name_the_key(tmp_path, body, key):
    with pytest.raises(ConfigError, match=key):
        load_dataset_config(dataset_toml(tmp_path, body))


def test_flags_fill_the_same_keys():
    out = dataset_fallbacks({"secondary_separator": ";;;", "enable_wildcard": True, "token_warmup_min": 3,
                             "token_warmup_step": 5.0, "face_crop_aug_range": "2.0,4.0",
                             "resize_interpolation": "area"})
    assert out["secondary_separator"] == ";;;" and out["enable_wildcard"] is True
    assert out["token_warmup_min"] == 3 and out["token_warmup_step"] == 5.0
    assert out["face_crop_aug_range"] == [2.0, 4.0] and out["resize_interpolation"] == "area"
    with pytest.raises(ConfigError, match="face_crop_aug_range"):
        dataset_fallbacks({"face_crop_aug_range": "2.0"})


# ---- through the trainer ---------------------------------------------------------------------------------------------

def test_debug_dataset_shows_the_captions_and_does_not_train(tmp_path, tiny_sdxl_file, shapes_dataset):
    for txt in Path(shapes_dataset["image_dir"]).glob("*.txt"):
        txt.write_text("a {red|blue} shape")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], debug_dataset=True, enable_wildcard=True,
                   dataset_class="my.Dataset", skip_cache_check=True)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    captions = re.findall(r"caption: '([^']*)'", r.stdout)
    assert len(captions) == 4 and set(captions) <= {"a red shape", "a blue shape"}, r.stdout
    assert "--dataset_class my.Dataset" in r.stderr and "--skip_cache_check" in r.stderr
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_two_steps_with_warmup_wildcards_and_resize_filter(tmp_path, tiny_sdxl_file, shapes_dataset):
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], enable_wildcard=True, token_warmup_step=2.0,
                   secondary_separator=";;;", resize_interpolation="bilinear", max_validation_steps=1)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "lora.safetensors").exists()


# ---- sample-prompt files (.txt / .toml / .json as sd-scripts reads them) ------------------------------------------------

from library.prompts.prompt_files import read_training_prompts  # noqa: E402
from library.train.sampling import check_prompt_file, requests_from_prompt_file  # noqa: E402

PROMPT_TOML = """
[prompt]
width = 64
height = 64
sample_steps = 2
negative_prompt = "blurry"

  [[prompt.subset]]
  prompt = "a red [circle] {not|a|template}"
  seed = 7
  scale = 5.5

  [[prompt.subset]]
  prompt = "a blue square"
  width = 96
  sample_sampler = "euler_a"
  guidance_scale = 3.5
"""


def test_toml_prompt_file_is_read_as_tables_not_lines(tmp_path):
    path = write_toml(tmp_path / "p.toml", PROMPT_TOML)
    reqs = requests_from_prompt_file(path, (32, 32), seed=100)
    assert [r.prompt for r in reqs] == ["a red [circle] {not|a|template}", "a blue square"]  # literal, as sd-scripts
    assert [(r.width, r.height, r.steps, r.negative_prompt) for r in reqs] == [(64, 64, 2, "blurry"),
                                                                                 (96, 64, 2, "blurry")]
    assert (reqs[0].seed, reqs[0].scale) == (7, 5.5)
    assert reqs[1].seed == 101  # no seed: base seed + index
    assert (reqs[1].sampler, reqs[1].guidance_scale, reqs[1].control_image) == ("euler_a", 3.5, None)
    assert (reqs[0].sampler, reqs[0].guidance_scale) == (None, None)


def test_json_prompt_file_takes_tables_and_lines(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "a cat", "width": 64, "height": 64, "sample_steps": 3, "seed": 1},'
                    ' "a dog --w 64 --h 96 --s 2 --d 3 --ss ddim --g 2.5 --l 4"]')
    reqs = requests_from_prompt_file(str(path), (32, 32), seed=0)
    assert [(r.prompt, r.width, r.height, r.steps, r.seed) for r in reqs] == [("a cat", 64, 64, 3, 1),
                                                                             ("a dog", 64, 96, 2, 3)]
    assert reqs[1].scale == 4.0 and (reqs[1].sampler, reqs[1].guidance_scale) == ("ddim", 2.5)


def test_text_lines_take_the_training_only_options(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\na {red|blue} ball --n ugly --ss k_euler --g 3 --ctr 0.25 --rcfg 1 --fs 3 --w 64\n")
    (entry,) = read_training_prompts(path)
    assert entry.sampler == "k_euler" and entry.guidance_scale == 3.0 and entry.spec.width == 64
    assert entry.spec.negative_template.source == "ugly"


@pytest.mark.parametrize("name, content, expected", [
    ("p.toml", '[prompt]\nwidth = 64\n', "[[prompt.subset]]"),
    ("p.toml", '[[prompt.subset]]\nprompt = "x"\nwidht = 64\n', "unknown key 'widht'"),
    ("p.toml", '[[prompt.subset]]\nprompt = "x"\nsample_steps = "many"\n', "sample_steps"),
    ("p.toml", '[[prompt.subset]]\nwidth = 64\n', "no 'prompt'"),
    ("p.json", '{"prompt": "x"}', "JSON list"),
    ("p.json", '[{"prompt": "x", "seed": -1}]', "item 1"),
    ("p.txt", "a cat --g lots\n", "line 1"),
    ("p.txt", "a cat --zz 3\n", "--zz"),
])
def test_bad_prompt_files_are_one_message_naming_the_entry(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    problems = check_prompt_file(str(path), 0)
    assert len(problems) == 1 and expected in problems[0] and str(path) in problems[0], problems


def test_unknown_per_prompt_sampler_is_found_before_training(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat --ss no_such_sampler\n")
    problems = check_prompt_file(str(path), 0)
    assert len(problems) == 1 and "line 1" in problems[0] and "no_such_sampler" in problems[0], problems


def test_toml_prompt_file_samples_during_training(tmp_path, tiny_sdxl_file, shapes_dataset):
    prompts = write_toml(tmp_path / "prompts.toml", """
[prompt]
width = 64
height = 64
sample_steps = 2

  [[prompt.subset]]
  prompt = "a red circle"
  seed = 5

  [[prompt.subset]]
  prompt = "a blue square"
  sample_sampler = "ddim"
""")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], sample_prompts=prompts,
                   sample_every_n_steps=2, sample_sampler="euler", network_train_unet_only=True)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted((tmp_path / "out" / "sample").glob("*.png"))
    assert len(pngs) == 2, pngs  # two entries, not one sample per TOML line
    from PIL import Image
    infos = [Image.open(p).text.get("parameters", "") for p in pngs]
    assert any("a red circle" in t for t in infos) and any("a blue square" in t for t in infos), infos


def test_bad_toml_prompt_file_stops_before_the_first_step(tmp_path, tiny_sdxl_file, shapes_dataset):
    prompts = write_toml(tmp_path / "prompts.toml", '[[prompt.subset]]\nprompt = "x"\nsample_steps = 0\n')
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], sample_prompts=prompts,
                   sample_every_n_steps=1)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "sample_steps" in r.stderr and "prompts.toml" in r.stderr
    assert not (tmp_path / "run_loss.jsonl").exists() or not (tmp_path / "run_loss.jsonl").read_text().strip()


# ---- text encoders: --max_token_length, --weighted_captions, --clip_skip -------------------------------------------

import torch  # noqa: E402

from library.families.sdxl_text import TextOptions, chunked_ids  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_models(tiny_sdxl_file):
    from library.families.registry import get_family
    from library.families.sdxl import SDXLFamilyModels
    from library.models.sdxl_loader import load_sdxl

    m = load_sdxl(tiny_sdxl_file, dtype=torch.float32)
    family = get_family("sdxl")
    models = SDXLFamilyModels.from_loaded(m)
    for te in models.text_encoders:
        te.eval()
    return family, models


def encode(sdxl_models, captions, opts=None):
    family, models = sdxl_models
    with torch.no_grad():
        return family.encode_text(replace(models, text_options=opts), captions)


def test_long_captions_are_encoded_in_pieces_with_the_first_pieces_pooled_output(sdxl_models):
    short = encode(sdxl_models, ["a red circle"])
    for length in (150, 225):
        out = encode(sdxl_models, ["a red circle"], TextOptions(max_token_length=length))
        assert out["encoder_hidden_states"].shape[1] == length + 2
        # a caption that fits the first piece: the same states there, and the same pooled output
        torch.testing.assert_close(out["encoder_hidden_states"][:, :76], short["encoder_hidden_states"][:, :76])
        torch.testing.assert_close(out["pooled"], short["pooled"])


def test_pieces_have_their_own_bos_and_eos(sdxl_models):
    _, models = sdxl_models
    for tok in models.tokenizers:
        text = " ".join(["dog"] * 100)
        ids = tok(text, padding="max_length", truncation=True, max_length=152, return_tensors="pt").input_ids[0]
        pieces = chunked_ids(tok, ids)
        assert pieces.shape == (2, 77)
        assert (pieces[:, 0] == tok.bos_token_id).all()
        assert pieces[0, -1] == tok.eos_token_id  # cut inside the text: closed with EOS
        assert torch.equal(pieces[0, 1:76], ids[1:76]) and torch.equal(pieces[1, 1:76], ids[76:151])


def test_long_caption_changes_with_its_tail_only_when_longer_pieces_are_on(sdxl_models):
    base = " ".join(["dog"] * 90)
    a, b = base + " red", base + " blue"
    plain = encode(sdxl_models, [a, b])
    torch.testing.assert_close(plain["encoder_hidden_states"][0], plain["encoder_hidden_states"][1])  # truncated
    long = encode(sdxl_models, [a, b], TextOptions(max_token_length=150))
    assert not torch.allclose(long["encoder_hidden_states"][0], long["encoder_hidden_states"][1])


def test_weighted_captions_scale_the_tokens_states(sdxl_models):
    opts = TextOptions(weighted_captions=True)
    plain = encode(sdxl_models, ["a cat"], opts)["encoder_hidden_states"]
    weighted = encode(sdxl_models, ["a (cat:2.0)"], opts)["encoder_hidden_states"]
    torch.testing.assert_close(weighted[:, 2], 2.0 * plain[:, 2])  # BOS, "a", "cat"
    torch.testing.assert_close(weighted[:, :2], plain[:, :2])
    torch.testing.assert_close(weighted[:, 3:], plain[:, 3:])
    # and in 150-token pieces
    opts150 = TextOptions(max_token_length=150, weighted_captions=True)
    p = encode(sdxl_models, ["a cat"], opts150)["encoder_hidden_states"]
    w = encode(sdxl_models, ["a (cat:2.0)"], opts150)["encoder_hidden_states"]
    torch.testing.assert_close(w[:, 2], 2.0 * p[:, 2])


def test_text_cache_provenance_names_the_options(sdxl_models):
    family, models = sdxl_models
    ids = {family.model_identity(replace(models, text_options=o), "text")
           for o in (None, TextOptions(), TextOptions(150), TextOptions(225), TextOptions(weighted_captions=True))}
    assert len(ids) == 4  # None and the defaults are the same cache


def test_two_steps_with_long_weighted_captions_and_clip_skip(tmp_path, tiny_sdxl_file, shapes_dataset):
    for txt in Path(shapes_dataset["image_dir"]).glob("*.txt"):
        txt.write_text("a (red:1.3) shape, " + ", ".join(["detail"] * 80))
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_token_length=225, weighted_captions=True,
                   clip_skip=2)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--clip_skip 2: not used" in r.stderr
    assert (tmp_path / "out" / "lora.safetensors").exists()


def test_cached_text_outputs_with_long_captions(tmp_path, tiny_sdxl_file, shapes_dataset):
    """The text cache holds 2 + 75n-token states with --max_token_length and is not mixed with 77-token ones."""
    for txt in Path(shapes_dataset["image_dir"]).glob("*.txt"):
        txt.write_text("a shape, " + ", ".join(["detail"] * 80))
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_token_length=150,
                   cache_text_encoder_outputs=True, network_train_unet_only=True)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "lora.safetensors").exists()


def test_network_multiplier_zero_leaves_the_lora_untrained(tmp_path, tiny_sdxl_file, shapes_dataset):
    """sd-scripts' dataset key network_multiplier: at 0 the network adds nothing, so its zero-initialised up
    weights get no gradient and stay zero; at 1 they move."""
    from safetensors.torch import load_file

    text = Path(shapes_dataset["config"]).read_text()
    ups = {}
    for mult in (0.0, 1.0):
        cfg_ds = write_toml(tmp_path / f"ds{mult}.toml",
                            text.replace("batch_size = 2", f"batch_size = 2\nnetwork_multiplier = {mult}"))
        out = tmp_path / f"out{mult}"
        cfg = run_toml(tmp_path, tiny_sdxl_file, cfg_ds, name=f"m{mult}", output_dir=str(out),
                       network_train_unet_only=True)
        r = run_script("sdxl_train_network.py", "--config_file", cfg)
        assert r.returncode == 0, r.stderr[-3000:]
        sd = load_file(str(out / "lora.safetensors"))
        ups[mult] = max(float(v.abs().max()) for k, v in sd.items() if "lora_up" in k)
    assert ups[0.0] == 0.0 and ups[1.0] > 0.0
