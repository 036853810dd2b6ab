"""The dynamic-prompt language and prompt-line options (library.prompts.language)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from library.errors import UserError
from library.prompts.language import (
    PromptSpec,
    PromptSyntaxError,
    WildcardError,
    WildcardSet,
    parse_prompt_line,
    parse_template,
    read_prompt_file,
)

DRAWS = 400


def draws(text: str, n: int = DRAWS, seed: int = 0, wildcards: WildcardSet | None = None) -> list[str]:
    template = parse_template(text)
    rng = random.Random(seed)
    return [template.render(rng, wildcards) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- variants


def test_plain_text_is_static_and_unchanged():
    template = parse_template("a photo of a cat, (masterpiece:1.2), \\(literal\\)")
    assert template.is_static
    assert template.render(random.Random(0)) == "a photo of a cat, (masterpiece:1.2), \\(literal\\)"


def test_single_pick_draws_every_option_and_nothing_else():
    out = Counter(draws("a {red|green|blue} ball"))
    assert set(out) == {"a red ball", "a green ball", "a blue ball"}
    assert min(out.values()) > DRAWS / 6  # roughly uniform, not stuck on one option


def test_fixed_seed_is_reproducible_and_different_seeds_differ():
    assert draws("{a|b|c|d} {e|f|g|h}", 50, seed=7) == draws("{a|b|c|d} {e|f|g|h}", 50, seed=7)
    assert draws("{a|b|c|d} {e|f|g|h}", 50, seed=7) != draws("{a|b|c|d} {e|f|g|h}", 50, seed=8)


def test_count_picks_that_many_distinct_options():
    results = draws("{2$$a|b|c}")
    for text in results:
        parts = text.split(", ")
        assert len(parts) == 2 and len(set(parts)) == 2 and set(parts) <= {"a", "b", "c"}
    # every pair and both orders appear over many draws
    assert len(set(results)) == 6


def test_range_counts_cover_the_whole_range():
    sizes = Counter(0 if text == "" else len(text.split(", ")) for text in draws("{0-2$$a|b|c}"))
    assert set(sizes) == {0, 1, 2}
    for text in draws("{0-2$$a|b|c}"):
        parts = [p for p in text.split(", ") if p]
        assert len(parts) == len(set(parts))


def test_open_ranges():
    low_open = Counter(len(text.split(", ")) for text in draws("{-2$$a|b|c}"))
    assert set(low_open) == {1, 2}  # lower bound defaults to 1
    high_open = Counter(len(text.split(", ")) for text in draws("{2-$$a|b|c|d}"))
    assert set(high_open) == {2, 3, 4}  # upper bound defaults to all options


def test_count_above_option_count_is_clamped():
    for text in draws("{5$$a|b}", 50):
        assert sorted(text.split(", ")) == ["a", "b"]


def test_zero_count_renders_nothing():
    assert set(draws("x{0$$a|b}y", 20)) == {"xy"}


def test_custom_separator():
    results = draws("{1-3$$ and $$a|b|c}")
    assert any(" and " in text for text in results)
    for text in results:
        parts = text.split(" and ")
        assert 1 <= len(parts) <= 3 and len(parts) == len(set(parts))
    # a separator without a count
    assert set(draws("{ or $$a|b}", 50)) == {"a", "b"}
    assert set(draws("{2$$/$$a|b}", 50)) == {"a/b", "b/a"}


def test_nesting():
    out = Counter(draws("{a|{b|c}}"))
    assert set(out) == {"a", "b", "c"}
    assert out["a"] > out["b"]  # 'a' is half of the draws, 'b' and 'c' a quarter each
    deep = set(draws("{x {1|2}|y {3|{4|5}}}"))
    assert deep == {"x 1", "x 2", "y 3", "y 4", "y 5"}


def test_nested_variant_inside_a_multi_pick():
    for text in draws("{2$$a|{b|c}|d}"):
        parts = text.split(", ")
        assert len(parts) == 2
        assert not {"b", "c"} <= set(parts)  # b and c come from one option: never both


def test_escaped_braces_and_bar_are_literal():
    assert draws("\\{a\\|b\\}", 3) == ["{a|b}"] * 3
    assert parse_template("\\{x\\}").is_static


def test_empty_options_are_allowed():
    assert set(draws("a{|b}", 100)) == {"a", "ab"}


# ----------------------------------------------------------------------------------------------- syntax errors


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("a {b|c", 2, "never closed"),
        ("a {b|{c|d}", 2, "never closed"),
        ("a b} c", 3, "no matching '{'"),
        ("{$$a|b}", 1, "empty count"),
        ("xy {$$ and $$a|b}", 4, "empty count"),
        ("{3-1$$a|b|c}", 1, "bad range"),
        ("{1-2-3$$a|b}", 1, "bad range"),
        ("{a|{2--$$b|c}}", 4, "bad range"),
        ("{e$$1$$, $$x$$a|b}", 11, "too many"),
    ],
)
def test_syntax_errors_report_position_and_caret(text, position, fragment):
    with pytest.raises(PromptSyntaxError) as info:
        parse_template(text)
    error = info.value
    assert isinstance(error, UserError)
    assert error.position == position
    assert fragment in str(error)
    lines = str(error).splitlines()
    assert lines[-2].strip() == text and lines[-1].index("^") - lines[-2].index(text[0]) == position


# ----------------------------------------------------------------------------------------------- wildcards


def _wildcard_dir(tmp_path):
    root = tmp_path / "wildcards"
    (root / "sub").mkdir(parents=True)
    (root / "color.txt").write_text("# colours\nred\n\ngreen\n", encoding="utf-8")
    (root / "animal.txt").write_text("__color__ cat\n{big|small} dog\n", encoding="utf-8")
    (root / "sub" / "place.txt").write_text("park\n", encoding="utf-8")
    (root / "loop_a.txt").write_text("__loop_b__\n", encoding="utf-8")
    (root / "loop_b.txt").write_text("x __loop_a__\n", encoding="utf-8")
    (root / "bad.txt").write_text("ok\n{unclosed\n", encoding="utf-8")
    return root


def test_wildcards_draw_lines_and_skip_comments_and_blanks(tmp_path):
    wildcards = WildcardSet.from_dirs([_wildcard_dir(tmp_path)])
    assert set(draws("__color__", 100, wildcards=wildcards)) == {"red", "green"}
    assert set(draws("in the __sub/place__", 10, wildcards=wildcards)) == {"in the park"}


def test_wildcard_lines_are_templates_and_nest(tmp_path):
    wildcards = WildcardSet.from_dirs([_wildcard_dir(tmp_path)])
    out = set(draws("a __animal__", 300, wildcards=wildcards))
    assert out == {"a red cat", "a green cat", "a big dog", "a small dog"}


def test_wildcard_inside_variant_and_earlier_dir_wins(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    (first / "color.txt").write_text("blue\n", encoding="utf-8")
    wildcards = WildcardSet.from_dirs([first, _wildcard_dir(tmp_path)])
    assert set(draws("{__color__|none}", 100, wildcards=wildcards)) == {"blue", "none"}


def test_missing_wildcard_names_it_and_the_dirs(tmp_path):
    root = _wildcard_dir(tmp_path)
    wildcards = WildcardSet.from_dirs([root])
    with pytest.raises(WildcardError) as info:
        parse_template("a __nope__").render(random.Random(0), wildcards)
    assert "__nope__" in str(info.value) and str(root) in str(info.value)
    with pytest.raises(WildcardError):
        wildcards.check(parse_template("{a|__nope__}"))  # found before anything renders
    with pytest.raises(WildcardError, match="no wildcard directory"):
        parse_template("__color__").render(random.Random(0))


def test_recursive_wildcards_fail_with_the_chain(tmp_path):
    wildcards = WildcardSet.from_dirs([_wildcard_dir(tmp_path)])
    with pytest.raises(WildcardError, match="loop_a -> loop_b -> loop_a"):
        parse_template("__loop_a__").render(random.Random(0), wildcards)


def test_wildcard_file_syntax_error_names_file_and_line(tmp_path):
    wildcards = WildcardSet.from_dirs([_wildcard_dir(tmp_path)])
    with pytest.raises(PromptSyntaxError, match=r"bad\.txt line 2"):
        parse_template("__bad__").render(random.Random(0), wildcards)


def test_missing_wildcard_dir_is_an_error(tmp_path):
    with pytest.raises(WildcardError, match="does not exist"):
        WildcardSet.from_dirs([tmp_path / "absent"])


def test_double_underscores_that_are_not_wildcards_stay_text():
    assert parse_template("a __ b ___ c").is_static
    assert parse_template("snake_case_name").is_static


# ----------------------------------------------------------------------------------------------- prompt lines


def test_prompt_line_options():
    spec = parse_prompt_line(
        "a {cat|dog} --n {ugly|blurry}, lowres --w 512 --H 768 --s 30 --d 1,2,3 --l 7.5 --am 0.5,-1 --t 0.4 --nl none"
    )
    assert isinstance(spec, PromptSpec)
    assert spec.template.source == "a {cat|dog}"
    assert spec.negative_template is not None and spec.negative_template.source == "{ugly|blurry}, lowres"
    assert (spec.width, spec.height, spec.steps, spec.scale, spec.strength) == (512, 768, 30, 7.5, 0.4)
    assert spec.seeds == (1, 2, 3) and spec.seed == 1
    assert [spec.seed_for(i) for i in range(4)] == [1, 2, 3, None]
    assert spec.network_muls == (0.5, -1.0)
    assert spec.negative_scale == "none"  # --nl none: off for this line (None: not given)
    rendered = spec.render(random.Random(0))
    assert rendered.prompt in {"a cat", "a dog"}
    assert rendered.negative_prompt in {"ugly, lowres", "blurry, lowres"}


def test_sdxl_conditioning_and_filename_options():
    spec = parse_prompt_line("x --ow 2048 --oh 1024 --nw 512 --nh 512 --ct 8 --cl 16 --f out_1")
    assert (spec.original_width, spec.original_height) == (2048, 1024)
    assert (spec.original_width_negative, spec.original_height_negative) == (512, 512)
    assert (spec.crop_top, spec.crop_left, spec.filename) == (8, 16, "out_1")


def test_prompt_line_without_options_and_defaults():
    spec = parse_prompt_line("  just a prompt  ")
    assert spec.template.source == "just a prompt"
    assert spec.negative_template is None and spec.width is None and spec.seeds is None
    assert spec.render(random.Random(0)).negative_prompt is None


def test_double_dash_inside_braces_or_words_is_prompt_text():
    spec = parse_prompt_line("{a --w 5|b} x--y --s 4")
    assert spec.template.source == "{a --w 5|b} x--y"
    assert spec.steps == 4 and spec.width is None


@pytest.mark.parametrize(
    "line, position, fragment",
    [
        ("a cat --zz 3", 6, "unknown prompt option '--zz'"),
        ("a cat --w abc", 10, "bad value 'abc' for '--w'"),
        ("a cat --w", 6, "needs a width"),
        ("a cat --s 0", 10, "at least 1"),
        ("a cat --d 1,x", 10, "bad value"),
        ("a cat --t 1.5", 10, "between 0 and 1"),
        ("a cat --w512", 6, "unknown prompt option"),
        ("a {cat --n x", 2, "never closed"),
        ("a cat --n bad}", 13, "no matching"),
        ("", 0, "empty prompt"),
    ],
)
def test_prompt_line_errors_point_into_the_line(line, position, fragment):
    with pytest.raises(PromptSyntaxError) as info:
        parse_prompt_line(line)
    assert info.value.position == position
    assert fragment in str(info.value)


def test_read_prompt_file_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\na cat --d 5\n   \n  # indented comment\n{a|b} dog --n bad\n", encoding="utf-8")
    specs = read_prompt_file(path)
    assert [s.template.source for s in specs] == ["a cat", "{a|b} dog"]
    assert [s.line_no for s in specs] == [3, 6]
    assert specs[0].seeds == (5,)


def test_read_prompt_file_error_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("good\n# c\nbad {x --w 5\n", encoding="utf-8")
    with pytest.raises(PromptSyntaxError) as info:
        read_prompt_file(path)
    assert f"{path} line 3" in str(info.value) and info.value.position == 4
    with pytest.raises(UserError, match="does not exist"):
        read_prompt_file(tmp_path / "absent.txt")


# ----------------------------------------------------------------------------------------------------- enumeration


def test_enumeration_gives_every_combination_in_sd_scripts_order():
    spec = parse_prompt_line("{e$$a|b} and {e$$1-2$$ + $$x|y} {p|q} --n {e$$n1|n2}")
    expanded = spec.expand()
    prompts = [(s.template.render(random.Random(0)), s.negative_template.render(random.Random(0))) for s in expanded]
    bodies = [p.rsplit(" ", 1)[0] for p, _ in prompts]
    assert bodies[::2] == ["a and x", "a and y", "a and x + y", "b and x", "b and y", "b and x + y"]
    assert [n for _, n in prompts] == ["n1", "n2"] * 6
    assert all(p.rsplit(" ", 1)[1] in ("p", "q") for p, _ in prompts)  # plain variants are still drawn
    assert parse_prompt_line("{a|b} c").expand() == [parse_prompt_line("{a|b} c")]


def test_enumeration_replaces_images_per_prompt_in_planning():
    from library.sample.generation import GenerationConfig, plan_requests

    c = GenerationConfig(model="m", outdir="o", width=64, height=64, images_per_prompt=5,
                         prompts=[parse_prompt_line("{e$$red|green|blue} cube"), parse_prompt_line("{e$$one} ball")])
    prompts = [r.prompt for r in plan_requests(c, None, 0)]
    assert prompts == ["red cube", "green cube", "blue cube"] + ["one ball"] * 5
