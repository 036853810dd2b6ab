"""Caption transforms follow sd-scripts' process_caption and are reproducible from the rng."""
from __future__ import annotations

import random

from library.data.captions import caption_ops_active, process_caption
from library.data.types import SubsetConfig

CAPTION = "sks dog, red collar, grass, sunny, park, running, happy"


def subset(**kw) -> SubsetConfig:
    return SubsetConfig(table="datasets[0].subsets[0]", **kw)


def tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")]


def test_no_ops_returns_caption_unchanged():
    s = subset()
    assert process_caption(CAPTION, s, random.Random(0), epoch=1) == CAPTION
    assert process_caption("first line\nsecond", s, random.Random(0), epoch=1) == "first line"
    assert not caption_ops_active(s)


def test_shuffle_keeps_first_tokens_and_permutes_rest():
    s = subset(shuffle_caption=True, keep_tokens=2)
    outs = {process_caption(CAPTION, s, random.Random(seed), epoch=1) for seed in range(20)}
    assert len(outs) > 5  # really permutes
    for out in outs:
        t = tags(out)
        assert t[:2] == ["sks dog", "red collar"]
        assert sorted(t) == sorted(tags(CAPTION))
    # deterministic for a given rng state
    assert process_caption(CAPTION, s, random.Random(3), 1) == process_caption(CAPTION, s, random.Random(3), 1)


def test_keep_tokens_separator_fixes_head_and_tail():
    s = subset(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    text = "sks, 1girl ||| a, b, c, d ||| best quality"
    seen = set()
    for seed in range(20):
        t = tags(process_caption(text, s, random.Random(seed), epoch=1))
        assert t[:2] == ["sks", "1girl"] and t[-1] == "best quality"  # separator wins over keep_tokens
        assert sorted(t[2:-1]) == ["a", "b", "c", "d"]
        seen.add(tuple(t))
    assert len(seen) > 3


def test_custom_separator_joined_with_comma_space():
    s = subset(shuffle_caption=True, caption_separator=";", keep_tokens=1)
    out = process_caption("x;y;z", s, random.Random(1), epoch=1)
    assert out.startswith("x, ") and sorted(tags(out)) == ["x", "y", "z"]


def test_caption_dropout_rate_and_every_n_epochs():
    s = subset(caption_dropout_rate=0.5)
    outs = [process_caption(CAPTION, s, random.Random(seed), epoch=1) for seed in range(200)]
    empty = outs.count("")
    assert 60 < empty < 140 and all(o in ("", CAPTION) for o in outs)
    assert process_caption(CAPTION, subset(caption_dropout_rate=1.0), random.Random(0), 1) == ""

    e = subset(caption_dropout_every_n_epochs=3)  # epochs 3 and 6 counted from 1 (sd-scripts), 2 and 5 from 0
    assert [process_caption(CAPTION, e, random.Random(0), ep) == "" for ep in range(0, 6)] == [
        False, False, True, False, False, True
    ]
    two = subset(caption_dropout_every_n_epochs=2)  # sd-scripts: epochs 2, 4, 6 counted from 1
    assert [process_caption(CAPTION, two, random.Random(0), ep) == "" for ep in range(0, 6)] == [
        False, True, False, True, False, True
    ]
    assert caption_ops_active(e)


def test_tag_dropout_spares_kept_tokens():
    s = subset(caption_tag_dropout_rate=0.5, keep_tokens=1)
    lengths = set()
    for seed in range(30):
        t = tags(process_caption(CAPTION, s, random.Random(seed), epoch=1))
        assert t[0] == "sks dog"
        assert all(x in tags(CAPTION) for x in t)
        assert t[1:] == [x for x in tags(CAPTION)[1:] if x in t[1:]]  # no shuffle: order kept
        lengths.add(len(t))
    assert len(lengths) > 2
    assert caption_ops_active(s)


def test_prefix_suffix_added_like_sd_scripts():
    s = subset(caption_prefix="photo of", caption_suffix="4k")
    assert process_caption("a cat", s, random.Random(0), 1) == "photo of a cat 4k"
    # prefix takes part in the token split (sd-scripts: shuffling includes prefix/suffix)
    s = subset(caption_prefix="masterpiece,", shuffle_caption=True, keep_tokens=1)
    for seed in range(5):
        assert process_caption("a, b, c", s, random.Random(seed), 1).startswith("masterpiece, ")
    # a dropped caption drops the prefix too (unconditional sample)
    assert process_caption("a", subset(caption_prefix="p", caption_dropout_rate=1.0), random.Random(0), 1) == ""


def test_caption_ops_active_flags():
    assert caption_ops_active(subset(shuffle_caption=True))
    assert caption_ops_active(subset(caption_dropout_rate=0.1))
    assert not caption_ops_active(subset(caption_prefix="x", keep_tokens=3, flip_aug=True))
