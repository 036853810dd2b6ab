"""Dataset TOML schema (inheritance, errors, kinds, paths) and record collection (captions, metadata, pairing)."""
from __future__ import annotations

import json
import os
import textwrap

import pytest
from PIL import Image

from library.config.dataset_schema import load_dataset_config
from library.data.sources import collect_records
from library.errors import ConfigError


def make_image(path, size=(64, 48), color=(200, 30, 30), fmt=None, exif=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, color)
    kwargs = {"exif": exif} if exif is not None else {}
    img.save(path, format=fmt, **kwargs)
    return str(path)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text))
    return str(path)


def toml_path(p) -> str:
    return str(p).replace("\\", "/")


@pytest.fixture
def img_dir(tmp_path):
    d = tmp_path / "imgs"
    make_image(d / "b.png", (64, 48))
    make_image(d / "a.JPG", (48, 64), fmt="JPEG")
    make_image(d / "c.webp", (80, 40), fmt="WEBP")
    (d / "notes.md").write_text("not an image")
    (d / "a.caption").write_text("a cat, sitting\nsecond line ignored", encoding="utf-8")
    return d


def config(tmp_path, body, name="dataset.toml"):
    return write(tmp_path / name, body)


# ---- inheritance and defaults ---------------------------------------------------------------------------------


def test_inheritance_general_dataset_subset(tmp_path, img_dir):
    cfg = config(
        tmp_path,
        f"""
        [general]
        resolution = 512
        shuffle_caption = true
        keep_tokens = 1
        num_repeats = 2
        enable_bucket = true
        caption_extension = ".caption"

        [[datasets]]
        resolution = [640, 384]
        num_repeats = 3
        batch_size = 4
        max_bucket_reso = 1024

          [[datasets.subsets]]
          image_dir = "{toml_path(img_dir)}"
          class_tokens = "sks dog"

          [[datasets.subsets]]
          image_dir = "{toml_path(img_dir)}"
          num_repeats = 7
          keep_tokens = 0
          is_reg = true
        """,
    )
    group = load_dataset_config(cfg)
    assert group.source == cfg
    (d,) = group.datasets
    assert d.table == "datasets[0]" and d.kind == "dreambooth"
    assert d.resolution == (640, 384) and d.batch_size == 4 and d.enable_bucket
    assert d.max_bucket_reso == 1024 and d.min_bucket_reso == 256 and d.bucket_reso_steps == 64
    s0, s1 = d.subsets
    assert s0.table == "datasets[0].subsets[0]" and s1.table == "datasets[0].subsets[1]"
    assert (s0.num_repeats, s0.keep_tokens, s0.shuffle_caption, s0.is_reg) == (3, 1, True, False)
    assert (s1.num_repeats, s1.keep_tokens, s1.is_reg) == (7, 0, True)
    assert s0.class_tokens == "sks dog" and s1.class_tokens is None
    assert s0.image_dir == os.path.abspath(img_dir)


def test_resolution_from_general_and_defaults(tmp_path, img_dir):
    cfg = config(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{toml_path(img_dir)}"\n')
    assert load_dataset_config(cfg, defaults={"resolution": 256}).datasets[0].resolution == (256, 256)
    with pytest.raises(ConfigError, match="resolution"):
        load_dataset_config(cfg)


def test_ignored_sd_scripts_keys_are_accepted(tmp_path, img_dir):
    cfg = config(
        tmp_path,
        f"""
        [general]
        resolution = 512
        secondary_separator = ";;;"
        enable_wildcard = true
        token_warmup_min = 1
        token_warmup_step = 0.5
        face_crop_aug_range = [2.0, 4.0]
        network_multiplier = 1.0

        [[datasets]]
        image_dir = "{toml_path(img_dir)}"
        [[datasets.subsets]]
        caption_prefix = "photo of"
        """,
    )
    d = load_dataset_config(cfg).datasets[0]
    assert d.subsets[0].image_dir == os.path.abspath(img_dir)  # inherited from the dataset table
    assert d.subsets[0].caption_prefix == "photo of"


# ---- errors name file, table and key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, table, key, hint",
    [
        ("[general]\nresolution = 512\nnum_repeat = 3\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
         "general", "num_repeat", "num_repeats"),
        ("[general]\nresolution = 512\n[[datasets]]\nbatchsize = 2\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
         "datasets[0]", "batchsize", "batch_size"),
        ("[general]\nresolution = 512\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\n"
         "[[datasets.subsets]]\nimage_dir = '{d}'\nshufle_caption = true\n",
         "datasets[0].subsets[1]", "shufle_caption", "shuffle_caption"),
    ],
)
def test_unknown_key_names_file_table_key_and_suggests(tmp_path, img_dir, body, table, key, hint):
    cfg = config(tmp_path, body.format(d=toml_path(img_dir)))
    with pytest.raises(ConfigError) as e:
        load_dataset_config(cfg)
    msg = str(e.value)
    assert cfg in msg and table in msg and f"'{key}'" in msg and f"did you mean '{hint}'" in msg
    assert e.value.table == table and e.value.key == key


@pytest.mark.parametrize(
    "line, key, expected",
    [
        ('num_repeats = "3"', "num_repeats", "an integer"),
        ('resolution = "big"', "resolution", "an integer or [width, height]"),
        ("resolution = [512, 512, 3]", "resolution", "an integer or [width, height]"),
        ('shuffle_caption = "yes"', "shuffle_caption", "a boolean"),
        ("caption_dropout_rate = true", "caption_dropout_rate", "a number"),
        ("caption_dropout_rate = 1.5", "caption_dropout_rate", "between 0 and 1"),
        ("num_repeats = 0", "num_repeats", ">= 1"),
        ("validation_split = 1.0", "validation_split", "between 0 and 1"),
    ],
)
def test_wrong_types(tmp_path, img_dir, line, key, expected):
    cfg = config(tmp_path, f"[general]\nresolution = 512\n[[datasets]]\n{line}\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\n")
    with pytest.raises(ConfigError) as e:
        load_dataset_config(cfg)
    msg = str(e.value)
    assert cfg in msg and "datasets[0]" in msg and f"'{key}'" in msg and expected in msg


def test_dataset_key_in_subset_is_rejected(tmp_path, img_dir):
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\nbatch_size = 2\n")
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subsets\[0\].*'batch_size'.*dataset-level"):
        load_dataset_config(cfg)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    cfg = config(tmp_path, "[general]\nresolution = 512\nshuffle_caption = tru e\n")
    with pytest.raises(ConfigError) as e:
        load_dataset_config(cfg)
    assert cfg in str(e.value) and "line 3" in str(e.value)


def test_bom_is_accepted_and_bad_bytes_name_the_line(tmp_path, img_dir):
    """Dataset TOMLs are read like run TOMLs (library/config/toml_read.py): a Windows editor's BOM is fine."""
    body = f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\n"
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_dataset_config(str(tmp_path / "bom.toml")).datasets[0].resolution == (64, 64)
    (tmp_path / "latin1.toml").write_bytes(body.encode() + b"class_tokens = 'caf\xe9'\n")
    with pytest.raises(ConfigError, match=r"line 5: byte 0xe9 is not UTF-8"):
        load_dataset_config(str(tmp_path / "latin1.toml"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_dataset_config(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("key", ["image_dir", "metadata_file", "conditioning_data_dir"])
def test_missing_paths_are_named(tmp_path, img_dir, key):
    paths = {"image_dir": toml_path(img_dir)}
    paths[key] = "does/not/exist"
    lines = "\n".join(f'{k} = "{v}"' for k, v in paths.items())
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n{lines}\n")
    with pytest.raises(ConfigError) as e:
        load_dataset_config(cfg)
    msg = str(e.value)
    assert "does/not/exist" in msg and "datasets[0].subsets[0]" in msg and f"'{key}'" in msg and cfg in msg


def test_relative_paths_cwd_first_then_toml_dir(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    make_image(conf_dir / "data" / "x.png")
    make_image(tmp_path / "cwd" / "data" / "y.png")
    cfg = config(conf_dir, "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'data'\nclass_tokens = 'c'\n")
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_dataset_config(cfg).datasets[0].subsets[0].image_dir == str(tmp_path / "cwd" / "data")
    monkeypatch.chdir(tmp_path)
    assert load_dataset_config(cfg).datasets[0].subsets[0].image_dir == str(conf_dir / "data")


# ---- kinds -----------------------------------------------------------------------------------------------------


def test_kinds_and_mixing(tmp_path, img_dir):
    meta = write(tmp_path / "meta.json", json.dumps({"b": {"caption": "x"}}))
    cond = tmp_path / "cond"
    cond.mkdir()
    d = toml_path(img_dir)
    cfg = config(
        tmp_path,
        f"""
        [general]
        resolution = 512
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
          metadata_file = "{toml_path(meta)}"
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
          conditioning_data_dir = "{toml_path(cond)}"
        """,
    )
    assert [x.kind for x in load_dataset_config(cfg).datasets] == ["dreambooth", "finetuning", "controlnet"]

    mixed = config(
        tmp_path,
        f"""
        [[datasets]]
        resolution = 512
          [[datasets.subsets]]
          image_dir = "{d}"
          [[datasets.subsets]]
          image_dir = "{d}"
          metadata_file = "{toml_path(meta)}"
        """,
        name="mixed.toml",
    )
    with pytest.raises(ConfigError, match=r"datasets\[0\].*mixes"):
        load_dataset_config(mixed)


def test_no_datasets_and_no_subsets(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[\[datasets\]\]"):
        load_dataset_config(config(tmp_path, "[general]\nresolution = 512\n"))
    with pytest.raises(ConfigError, match=r"datasets\[0\].*no \[\[datasets.subsets\]\]"):
        load_dataset_config(config(tmp_path, "[[datasets]]\nresolution = 512\n", name="b.toml"))


# ---- bucket settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, key",
    [
        ("min_bucket_reso = 1024\nmax_bucket_reso = 512", "min_bucket_reso"),
        ("bucket_reso_steps = 12", "bucket_reso_steps"),
        ("min_bucket_reso = 768", "min_bucket_reso"),
        ("max_bucket_reso = 256", "max_bucket_reso"),
    ],
)
def test_bucket_setting_errors(tmp_path, img_dir, lines, key):
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 512\nenable_bucket = true\n{lines}\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\n")
    with pytest.raises(ConfigError) as e:
        load_dataset_config(cfg)
    assert f"'{key}'" in str(e.value) and "datasets[0]" in str(e.value)


def test_bucket_min_max_rounded_to_step_like_sd_scripts(tmp_path, img_dir):
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 512\nenable_bucket = true\nmin_bucket_reso = 320\nmax_bucket_reso = 1000\n"
                           f"bucket_reso_steps = 128\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\n")
    d = load_dataset_config(cfg).datasets[0]
    assert (d.min_bucket_reso, d.max_bucket_reso) == (256, 1024)


# ---- records: DreamBooth captions ---------------------------------------------------------------------------


def load_records(cfg):
    group = load_dataset_config(cfg)
    return [collect_records(d, group.source) for d in group.datasets]


def test_dreambooth_captions_and_fallbacks(tmp_path, img_dir):
    write(img_dir / "captions.txt", "# comment\nc.webp\tfrom listing\nb|listed b\n")
    (img_dir / "b.caption").write_text("own file wins", encoding="utf-8")
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\nclass_tokens = 'sks'\n")
    (records,) = load_records(cfg)[0]
    assert [os.path.basename(r.path) for r in records] == ["a.JPG", "b.png", "c.webp"]
    assert [r.caption for r in records] == ["a cat, sitting", "own file wins", "from listing"]
    assert all(r.subset_index == 0 and not r.is_reg and r.split == "train" for r in records)

    os.remove(img_dir / "captions.txt")
    (records,) = load_records(cfg)[0]
    assert records[2].caption == "sks"  # class_tokens fallback


def test_caption_extension_is_the_only_per_image_file(tmp_path, img_dir, caplog):
    (img_dir / "b.txt").write_text("txt caption", encoding="utf-8")
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\n")
    with caplog.at_level("WARNING"):
        (records,) = load_records(cfg)[0]  # as sd-scripts: no caption and no class_tokens -> empty caption, warned
    assert [r.caption for r in records] == ["a cat, sitting", "", ""]
    msg = caplog.text
    assert "2 image(s)" in msg and "b.png" in msg and "c.webp" in msg and "class_tokens" in msg and cfg in msg
    cfg2 = config(tmp_path, f"[[datasets]]\nresolution = 64\ncaption_extension = 'txt'\n[[datasets.subsets]]\n"
                            f"image_dir = '{toml_path(img_dir)}'\nclass_tokens = 'k'\n", name="t.toml")
    (records,) = load_records(cfg2)[0]
    assert [r.caption for r in records] == ["k", "txt caption", "k"]  # ".caption" files are not read now


def test_bad_captions_txt_line(tmp_path, img_dir):
    write(img_dir / "captions.txt", "b.png\tok\nbroken line\n")
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\nclass_tokens='k'\n")
    with pytest.raises(ConfigError, match="captions.txt line 2"):
        load_records(cfg)


def test_empty_subset_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(empty)}'\nclass_tokens='k'\n")
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subsets\[0\].*no images found"):
        load_records(cfg)


def test_is_reg_propagates(tmp_path, img_dir):
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\nclass_tokens='k'\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\n"
                           f"[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\nis_reg = true\n")
    s0, s1 = load_records(cfg)[0]
    assert not any(r.is_reg for r in s0) and all(r.is_reg and r.subset_index == 1 for r in s1)


# ---- records: metadata formats -----------------------------------------------------------------------------


def test_metadata_json_sd_scripts(tmp_path, img_dir):
    meta = {
        "b": {"caption": "a photo", "tags": "red, square"},
        str(img_dir / "a.JPG"): {"caption": "absolute"},
        "c.webp": {"tags": "only tags"},
    }
    mf = write(tmp_path / "meta" / "meta_cap.json", json.dumps(meta))
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\nmetadata_file = '{toml_path(mf)}'\n")
    (records,) = load_records(cfg)[0]
    assert {os.path.basename(r.path): r.caption for r in records} == {
        "a.JPG": "absolute",
        "b.png": "a photo, red, square",
        "c.webp": "only tags",
    }


def test_metadata_json_missing_image_and_bad_json(tmp_path, img_dir):
    mf = write(tmp_path / "m.json", json.dumps({"b": {"caption": "x"}, "ghost": {"caption": "y"}}))
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\nmetadata_file = '{toml_path(mf)}'\n")
    with pytest.raises(ConfigError, match="ghost"):
        load_records(cfg)
    write(tmp_path / "m.json", '{\n  "b": {"caption": "x"},\n  oops\n}')
    with pytest.raises(ConfigError, match="m.json line 3"):
        load_records(cfg)


def test_metadata_jsonl_diffusers_with_conditioning(tmp_path):
    root = tmp_path / "train"
    make_image(root / "one.png")
    make_image(root / "two.png")
    make_image(root / "cond" / "one_c.png")
    lines = [
        {"file_name": "one.png", "text": "first", "conditioning_image": "cond/one_c.png"},
        {"file_name": "two.png", "text": "second"},
    ]
    mf = write(root / "metadata.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{toml_path(mf)}'\n")
    (records,) = load_records(cfg)[0]
    assert [(os.path.basename(r.path), r.caption) for r in records] == [("one.png", "first"), ("two.png", "second")]
    assert records[0].conditioning_path == str(root / "cond" / "one_c.png") and records[1].conditioning_path is None

    write(root / "metadata.jsonl", json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ConfigError) as e:
        load_records(cfg)
    assert "metadata.jsonl line 2" in str(e.value) and "datasets[0].subsets[0]" in str(e.value)


def test_metadata_csv(tmp_path, img_dir):
    mf = write(tmp_path / "m.csv", 'image,caption\nb.png,"a, quoted caption"\nc,plain\n')
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\nmetadata_file = '{toml_path(mf)}'\n")
    (records,) = load_records(cfg)[0]
    assert [(os.path.basename(r.path), r.caption) for r in records] == [("b.png", "a, quoted caption"), ("c.webp", "plain")]
    write(tmp_path / "m.csv", "picture,text\nb.png,x\n")
    with pytest.raises(ConfigError, match="no image column"):
        load_records(cfg)


# ---- records: ControlNet --------------------------------------------------------------------------------------


def test_controlnet_pairing_and_missing(tmp_path, img_dir):
    cond = tmp_path / "cond"
    make_image(cond / "a.png")
    make_image(cond / "b.jpg", fmt="JPEG")
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\nclass_tokens = 'k'\n[[datasets.subsets]]\nimage_dir = '{toml_path(img_dir)}'\n"
                           f"conditioning_data_dir = '{toml_path(cond)}'\n")
    with pytest.raises(ConfigError) as e:
        load_records(cfg)
    msg = str(e.value)
    assert "1 image(s)" in msg and "c.webp" in msg and "'conditioning_data_dir'" in msg and str(cond) in msg

    make_image(cond / "c.PNG")
    (records,) = load_records(cfg)[0]
    assert [os.path.basename(r.conditioning_path) for r in records] == ["a.png", "b.jpg", "c.PNG"]


def test_controlnet_missing_list_is_capped(tmp_path):
    d = tmp_path / "many"
    for i in range(8):
        make_image(d / f"img{i}.png", (16, 16))
    cond = tmp_path / "cond"
    cond.mkdir()
    cfg = config(tmp_path, f"[[datasets]]\nresolution = 64\nclass_tokens = 'k'\n[[datasets.subsets]]\nimage_dir = '{toml_path(d)}'\n"
                           f"conditioning_data_dir = '{toml_path(cond)}'\n")
    with pytest.raises(ConfigError) as e:
        load_records(cfg)
    msg = str(e.value)
    assert "8 image(s)" in msg and "img4.png" in msg and "img5.png" not in msg and "3 more" in msg


# ---- validation split --------------------------------------------------------------------------------------


def test_validation_split_deterministic_and_disjoint(tmp_path):
    d = tmp_path / "v"
    for i in range(20):
        make_image(d / f"{i:02d}.png", (8, 8))
    body = f"[[datasets]]\nresolution = 64\nclass_tokens = 'k'\nvalidation_split = 0.25\n{{seed}}[[datasets.subsets]]\nimage_dir = '{toml_path(d)}'\n"
    cfg = config(tmp_path, body.format(seed=""))
    (r1,) = load_records(cfg)[0]
    (r2,) = load_records(cfg)[0]
    val = [r.path for r in r1 if r.split == "validation"]
    train = [r.path for r in r1 if r.split == "train"]
    assert len(val) == 5 and len(train) == 15 and not set(val) & set(train)
    assert val == [r.path for r in r2 if r.split == "validation"]
    other = config(tmp_path, body.format(seed="validation_seed = 7\n"), name="seed7.toml")
    (r3,) = load_records(other)[0]
    assert [r.path for r in r3 if r.split == "validation"] != val  # the seed changes the choice
    assert sum(r.split == "validation" for r in r3) == 5
