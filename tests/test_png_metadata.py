"""PNG generation metadata (library.prompts.png_metadata): our chunks, the A1111 view, and reading others' files."""
from __future__ import annotations

import pytest
from PIL import Image, PngImagePlugin

from library.errors import UserError
from library.prompts.png_metadata import (
    GenerationInfo,
    format_a1111_parameters,
    parse_a1111_parameters,
    read_png_info,
    save_png_with_info,
)


def _image(width: int = 64, height: int = 48) -> Image.Image:
    return Image.new("RGB", (width, height), (10, 20, 30))


def test_round_trip_and_sd_scripts_chunks(tmp_path):
    info = GenerationInfo(
        prompt="a cat, {not a template}, 日本語",
        negative_prompt="ugly, blurry",
        seed=42,
        steps=30,
        scale=7.5,
        sampler="euler_a",
        model="tiny-sdxl",
        extra={"network-mul": "0.8"},
    )
    path = save_png_with_info(_image(), tmp_path / "out" / "img.png", info)
    assert path.exists() and not list(path.parent.glob("*.tmp"))  # atomic: no temp file left

    with Image.open(path) as image:
        chunks = dict(image.text)
        assert image.size == (64, 48)
    assert chunks["prompt"] == info.prompt
    assert chunks["negative-prompt"] == "ugly, blurry"
    assert (chunks["seed"], chunks["steps"], chunks["scale"], chunks["sampler"]) == ("42", "30", "7.5", "euler_a")
    assert chunks["network-mul"] == "0.8"
    assert chunks["parameters"] == (
        "a cat, {not a template}, 日本語\nNegative prompt: ugly, blurry\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x48, Model: tiny-sdxl"
    )

    back = read_png_info(path)
    assert back == GenerationInfo(
        prompt=info.prompt,
        negative_prompt="ugly, blurry",
        seed=42,
        steps=30,
        scale=7.5,
        sampler="euler_a",
        width=64,
        height=48,
        model="tiny-sdxl",
        extra={"network-mul": "0.8"},
    )


def test_a1111_text_omits_empty_negative_and_unknown_fields():
    text = format_a1111_parameters(GenerationInfo(prompt="p", steps=4, sampler="k_dpm_2_a", scale=5.0, seed=0))
    assert text == "p\nSteps: 4, Sampler: DPM2 a, CFG scale: 5, Seed: 0"


def _png_with_text(path, **chunks):
    meta = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        meta.add_text(key, value)
    _image(32, 32).save(path, format="PNG", pnginfo=meta)
    return path


def test_fallback_to_a1111_parameters_written_by_another_tool(tmp_path):
    parameters = (
        "masterpiece, a dog\nsecond prompt line\n"
        "Negative prompt: lowres\nbad hands\n"
        'Steps: 20, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: abc123, '
        'Lora hashes: "foo: 1a2b, bar: 3c4d", Version: v1.9'
    )
    path = _png_with_text(tmp_path / "a1111.png", parameters=parameters)
    info = read_png_info(path)
    assert info is not None
    assert info.prompt == "masterpiece, a dog\nsecond prompt line"
    assert info.negative_prompt == "lowres\nbad hands"
    assert (info.steps, info.scale, info.seed) == (20, 6.5, 1234)
    assert info.sampler == "dpmsolver++"  # mapped back to the sd-scripts name
    assert (info.width, info.height) == (512, 768)  # from the text, not the 32x32 image
    assert info.extra == {"Model hash": "abc123", "Lora hashes": "foo: 1a2b, bar: 3c4d", "Version": "v1.9"}


def test_a1111_parameters_without_settings_line_or_with_unknown_sampler():
    info = parse_a1111_parameters("just a prompt")
    assert info.prompt == "just a prompt" and info.steps is None and info.negative_prompt == ""
    info = parse_a1111_parameters("p\nSteps: 10, Sampler: UniPC, CFG scale: 3, Seed: 9")
    assert info.sampler == "UniPC" and info.seed == 9


def test_our_chunks_win_over_parameters(tmp_path):
    path = _png_with_text(tmp_path / "both.png", prompt="ours", parameters="theirs\nSteps: 1, Seed: 2, CFG scale: 3")
    info = read_png_info(path)
    assert info is not None and info.prompt == "ours" and info.steps is None


def test_images_without_metadata_and_bad_files(tmp_path):
    plain = tmp_path / "plain.png"
    _image().save(plain)
    assert read_png_info(plain) is None
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        read_png_info(broken)
    with pytest.raises(UserError, match="does not exist"):
        read_png_info(tmp_path / "absent.png")


def test_extra_keys_cannot_overwrite_standard_chunks(tmp_path):
    with pytest.raises(ValueError, match="prompt"):
        save_png_with_info(_image(), tmp_path / "x.png", GenerationInfo(prompt="p", extra={"prompt": "q"}))
