"""Bucket candidates and assignment match sd-scripts (values worked out by hand from its algorithm)."""
from __future__ import annotations

import pytest

from library.data.buckets import (
    BucketAssignment,
    BucketError,
    BucketSpec,
    assign_bucket,
    bucket_histogram,
    make_bucket_resolutions,
)
from library.data.types import DatasetConfig


def sdxl_spec(**kw) -> BucketSpec:
    return BucketSpec(resolution=(1024, 1024), enable_bucket=True, min_reso=256, max_reso=2048, step=64, **kw)


def test_sdxl_candidates_known_values():
    resos = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert resos == sorted(resos) and len(set(resos)) == len(resos)
    # square of the max area; 1536 -> (2**20 // 1536) // 64 * 64 = 640; 832 -> 1260 // 64 * 64 = 1216; 256 -> capped at 2048
    for reso in [(1024, 1024), (640, 1536), (1536, 640), (832, 1216), (1216, 832), (896, 1152), (960, 1088),
                 (640, 1600), (256, 2048), (2048, 256)]:
        assert reso in resos
    assert all(w * h <= 1024 * 1024 for w, h in resos)
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 2048 for w, h in resos)
    assert (1024, 1088) not in resos and (704, 1536) not in resos


def test_sd15_candidate_list_exact():
    # the well-known 512 list of sd-scripts (min 256, max 1024, step 64)
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((1024, 1024), (1024, 1024), (1024, 1024)),
        ((1000, 1500), (832, 1216), (832, 1248)),  # nearest aspect 0.684; width matched, height cropped
        ((3000, 1000), (1728, 576), (1728, 576)),  # exact aspect 3.0
        ((832, 1216), (832, 1216), (832, 1216)),  # an exact bucket is kept
        ((500, 500), (1024, 1024), (1024, 1024)),  # upscaled when allowed
    ],
)
def test_assign_bucket_nearest_aspect(size, bucket, resized):
    a = assign_bucket(sdxl_spec(), size)
    assert a.bucket == bucket and a.resized_size == resized
    assert a.resized_size[0] >= a.bucket[0] and a.resized_size[1] >= a.bucket[1]


def test_bucketing_off_uses_resolution_and_covers_it():
    spec = BucketSpec(resolution=(512, 512), enable_bucket=False)
    a = assign_bucket(spec, (800, 600))
    assert a.bucket == (512, 512) and a.resized_size == (683, 512)  # 800 * 512/600 = 682.67 -> 683
    a = assign_bucket(spec, (300, 900))
    assert a.bucket == (512, 512) and a.resized_size == (512, 1536)
    # bucket_no_upscale only matters with bucketing on
    assert assign_bucket(BucketSpec((512, 512), enable_bucket=False, no_upscale=True), (300, 900)).bucket == (512, 512)


def test_no_upscale():
    spec = BucketSpec(resolution=(512, 512), enable_bucket=True, step=64, no_upscale=True)
    small = assign_bucket(spec, (300, 200))
    assert small.bucket == (256, 192) and small.resized_size == (300, 200)  # never enlarged, rounded down
    big = assign_bucket(spec, (1000, 500))
    # area 2**18 at aspect 2: w ~724 -> 704 (h 320, aspect 2.2) vs h ~362 -> 320 (w 640, aspect 2.0): height wins
    assert big.bucket == (640, 320) and big.resized_size == (640, 320)
    with pytest.raises(BucketError, match="bucket_reso_steps"):
        assign_bucket(spec, (40, 100))


def test_spec_from_dataset_and_histogram():
    d = DatasetConfig(table="datasets[0]", kind="dreambooth", resolution=(512, 512), enable_bucket=True,
                      min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64, bucket_no_upscale=False)
    spec = BucketSpec.from_dataset(d)
    assert spec == BucketSpec((512, 512), True, 256, 1024, 64, False)
    sizes = [(512, 512), (600, 610), (300, 700), (700, 300), (400, 400)]
    assigned = [assign_bucket(spec, s) for s in sizes]
    assert [a.bucket for a in assigned] == [(512, 512), (512, 512), (320, 768), (768, 320), (512, 512)]
    assert bucket_histogram(assigned) == [((320, 768), 1), ((512, 512), 3), ((768, 320), 1)]
    assert bucket_histogram([]) == []
    assert isinstance(assigned[0], BucketAssignment)
