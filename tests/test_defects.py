"""Tests of the injected survey-image defects (``pipeline.sim.defects``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import InputError, OptionError
from pipeline.sim.defects import COSMIC_RAY_AMPLITUDE, HOT_RANGE, Defects, add_defects, bleed_trails

MAPS = ("source_bad", "target_bad", "source_pixels", "target_pixels", "source_column", "target_column",
        "source_saturated", "target_saturated", "source_bleed", "target_bleed", "cosmic_ray")


def scene(seed: int, shape: tuple[int, int] = (64, 48), n_stars: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A noisy pair with a few bright, round stars (some far above any saturation level tested)."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape)
    src = rng.normal(0.0, 10.0, shape)
    tgt = rng.normal(0.0, 10.0, shape)
    for _ in range(n_stars):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        flux = 10 ** rng.uniform(3, 6)
        r2 = (y - cy) ** 2 + (x - cx) ** 2
        src += flux / (2 * math.pi * 2.0) * np.exp(-r2 / 4.0)
        tgt += flux / (2 * math.pi * 4.0) * np.exp(-r2 / 8.0)
    return src, tgt


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


options = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "bad_source": st.sampled_from([0.0, 0.001, 0.05, 0.3]),
    "bad_target": st.sampled_from([0.0, 0.001, 0.05, 0.3]),
    "bad_column": st.sampled_from([None, "source", "target", "both"]),
    "saturation": st.one_of(st.none(), st.floats(50.0, 5e4)),
    "bleed": st.booleans(),
    "cosmic_rays": st.integers(0, 12),
    "flag_bad": st.booleans(),
})


@given(scene_seed=st.integers(0, 1000), opts=options)
def test_every_changed_pixel_is_in_the_truth_mask(scene_seed: int, opts: dict) -> None:
    src, tgt = scene(scene_seed)
    src0, tgt0 = src.copy(), tgt.copy()
    d = add_defects(src, tgt, **opts)
    # the inputs are untouched, the outputs are float64 copies
    assert same(src, src0) and same(tgt, tgt0)
    assert d.source.dtype == d.target.dtype == np.float64
    assert not np.shares_memory(d.source, src) and not np.shares_memory(d.target, tgt)
    for name in MAPS:
        m = getattr(d, name)
        assert m.dtype == bool and m.shape == src.shape
    # a pixel that differs from the input is marked; the per-kind maps are inside the truth mask
    assert not (~np.equal(d.source, src) & ~d.source_bad).any()
    assert not (~np.equal(d.target, tgt) & ~d.target_bad).any()
    for kind in ("pixels", "column", "saturated", "bleed"):
        assert not (getattr(d, f"source_{kind}") & ~d.source_bad).any()
        assert not (getattr(d, f"target_{kind}") & ~d.target_bad).any()
    assert not (d.cosmic_ray & ~d.target_bad).any()
    # NaN exactly where the data flag bad pixels and columns, and nowhere when they do not
    for img, pixels, column in ((d.source, d.source_pixels, d.source_column),
                                (d.target, d.target_pixels, d.target_column)):
        if opts["flag_bad"]:
            np.testing.assert_array_equal(np.isnan(img), pixels | column)
        else:
            assert np.isfinite(img).all()
    # saturation: nothing above the level, every pixel at the level marked
    level = opts["saturation"]
    if level is not None:
        for img, bad in ((d.source, d.source_bad), (d.target, d.target_bad)):
            assert not (img[np.isfinite(img)] > level).any()
            assert bad[img == level].all()
    else:
        assert not (d.source_saturated.any() or d.target_saturated.any())
    if not opts["bleed"]:
        assert not (d.source_bleed.any() or d.target_bleed.any())
    # the same seed gives the same result
    again = add_defects(src, tgt, **opts)
    for name in ("source", "target", *MAPS):
        assert same(getattr(again, name), getattr(d, name))


@given(seed=st.integers(0, 2**32 - 1), rays=st.integers(0, 20))
def test_cosmic_rays_hit_only_the_target(seed: int, rays: int) -> None:
    src, tgt = scene(3)
    d = add_defects(src, tgt, seed=seed, cosmic_rays=rays)
    np.testing.assert_array_equal(d.source, src)
    assert not d.source_bad.any()
    np.testing.assert_array_equal(d.target_bad, d.cosmic_ray)
    np.testing.assert_array_equal(d.target[~d.cosmic_ray], tgt[~d.cosmic_ray])
    added = (d.target - tgt)[d.cosmic_ray]
    # each hit pixel gets at least the smallest amplitude (overlapping tracks add up)
    assert (added >= COSMIC_RAY_AMPLITUDE[0] * (1 - 1e-9)).all()
    # 1-2 px wide, at most 15 px long: a track covers at most 2 * 16 pixels
    assert d.cosmic_ray.sum() <= 32 * rays
    if rays == 0:
        assert not d.cosmic_ray.any()


def test_cosmic_rays_are_sharp_tracks_with_log_uniform_amplitudes() -> None:
    src = np.zeros((1024, 1024))
    d = add_defects(src, src, seed=5, cosmic_rays=300)
    labels, n = scipy.ndimage.label(d.cosmic_ray, structure=np.ones((3, 3)))
    assert 200 < n <= 300  # a few tracks touch or leave the image
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() >= 1 and sizes.max() <= 2 * 32
    # amplitude: constant along an isolated track, log-uniform over the tracks
    amps = np.array(scipy.ndimage.maximum(d.target, labels, np.arange(1, n + 1)))
    lo, hi = COSMIC_RAY_AMPLITUDE
    assert amps.min() >= lo and amps.max() <= 2 * hi
    median = np.median(amps)
    assert math.sqrt(lo * hi) / 1.5 < median < math.sqrt(lo * hi) * 1.5
    # sharp: nothing outside the hit pixels
    assert (d.target[~d.cosmic_ray] == 0).all()


@pytest.mark.parametrize("p", [1e-4, 1e-3, 3e-3, 0.1])
@pytest.mark.parametrize("which", ["source", "target"])
def test_bad_pixel_rates(p: float, which: str) -> None:
    shape = (512, 512)
    src, tgt = np.zeros(shape), np.ones(shape)
    n = src.size
    for seed in range(3):
        d = add_defects(src, tgt, seed=seed, **{f"bad_{which}": p})
        count = int(getattr(d, f"{which}_pixels").sum())
        sd = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 5 * sd + 1, (count, n * p)
        other = "target" if which == "source" else "source"
        assert not getattr(d, f"{other}_bad").any()
        np.testing.assert_array_equal(np.isnan(getattr(d, which)), getattr(d, f"{which}_pixels"))


def test_unflagged_bad_pixels_are_hot_or_dead() -> None:
    shape = (400, 400)
    src = np.zeros(shape)
    d = add_defects(src, src, seed=11, bad_source=0.01, bad_target=0.01, flag_bad=False, sky=800.0)
    for img, pixels in ((d.source, d.source_pixels), (d.target, d.target_pixels)):
        values = img[pixels]
        dead = values == -800.0
        hot = (values >= HOT_RANGE[0]) & (values <= HOT_RANGE[1])
        assert (dead | hot).all()
        # about half each
        assert 0.35 < dead.mean() < 0.65
        assert (img[~pixels] == 0).all()
    # hot pixels saturate like any other
    capped = add_defects(src, src, seed=11, bad_source=0.01, flag_bad=False, saturation=2e4, sky=800.0)
    assert capped.source.max() == 2e4
    np.testing.assert_array_equal(capped.source_pixels, d.source_pixels)


@pytest.mark.parametrize("flag_bad", [True, False])
@pytest.mark.parametrize("which", ["source", "target", "both"])
def test_bad_column(which: str, flag_bad: bool) -> None:
    shape = (50, 70)
    src, tgt = np.zeros(shape), np.zeros(shape)
    d = add_defects(src, tgt, seed=2, bad_column=which, flag_bad=flag_bad)
    columns = {}
    for name in ("source", "target"):
        col = getattr(d, f"{name}_column")
        img = getattr(d, name)
        if which in (name, "both"):
            xs = np.flatnonzero(col.any(axis=0))
            assert xs.size == 1 and col[:, xs[0]].all() and col.sum() == shape[0]
            columns[name] = xs[0]
            values = img[:, xs[0]]
            if flag_bad:
                assert np.isnan(values).all()
            else:
                assert ((values >= HOT_RANGE[0]) & (values <= HOT_RANGE[1])).all()
            np.testing.assert_array_equal(getattr(d, f"{name}_bad"), col)
        else:
            assert not col.any() and not getattr(d, f"{name}_bad").any()
            assert (img == 0).all()
    if which == "both":
        assert columns["source"] == columns["target"]


def test_saturation_without_bleeding_caps_at_the_level() -> None:
    src, tgt = scene(7)
    level = 2000.0
    d = add_defects(src, tgt, seed=0, saturation=level, bleed=False)
    for name, img in (("source", src), ("target", tgt)):
        out = getattr(d, name)
        np.testing.assert_array_equal(out, np.minimum(img, level))
        np.testing.assert_array_equal(getattr(d, f"{name}_saturated"), img >= level)
        np.testing.assert_array_equal(getattr(d, f"{name}_bad"), img >= level)
        assert getattr(d, f"{name}_saturated").any()


def test_bleed_trail_of_one_run() -> None:
    img = np.zeros((40, 5))
    img[20:23, 2] = [150.0, 400.0, 150.0]  # excess 50 + 300 + 50 = 400 = 4 levels
    cores, trails = bleed_trails(img, 100.0)
    np.testing.assert_array_equal(np.flatnonzero(cores[:, 2]), [20, 21, 22])
    np.testing.assert_array_equal(np.flatnonzero(trails[:, 2]), [18, 19, 23, 24])
    assert cores.sum() == 3 and trails.sum() == 4
    # clipped at the edge of the image
    img = np.zeros((10, 1))
    img[0, 0] = 100.0 * 7  # excess 6 levels: 3 up (off the image), 3 down
    cores, trails = bleed_trails(img, 100.0)
    np.testing.assert_array_equal(np.flatnonzero(trails[:, 0]), [1, 2, 3])


@given(scene_seed=st.integers(0, 1000), level=st.floats(100.0, 2e4))
def test_bleed_trails_are_vertical_and_contiguous(scene_seed: int, level: float) -> None:
    src, tgt = scene(scene_seed, shape=(96, 40), n_stars=8)
    d = add_defects(src, tgt, seed=1, saturation=level)
    for name, img in (("source", src), ("target", tgt)):
        cores = img >= level
        sat = getattr(d, f"{name}_saturated")
        trail = getattr(d, f"{name}_bleed")
        np.testing.assert_array_equal(sat, cores | trail)
        assert not (trail & cores).any()
        np.testing.assert_array_equal(getattr(d, name)[sat], level)
        # every vertical run of saturated pixels holds a core: trails extend cores along their column
        runs, n = scipy.ndimage.label(sat, structure=[[0, 1, 0], [0, 1, 0], [0, 1, 0]])
        if n:
            assert (np.bincount(runs[cores], minlength=n + 1)[1:] > 0).all()
        # the total trail length: each run's excess over the level, in levels (clipped at the edges)
        excess = np.where(cores, img - level, 0.0)
        assert trail.sum() <= np.floor(excess.sum(axis=0) / level + 0.5 * cores.sum(axis=0) + 1).sum()


def test_kinds_draw_independently() -> None:
    src, tgt = scene(1)
    base = add_defects(src, tgt, seed=9, bad_source=0.02, bad_target=0.02)
    more = add_defects(src, tgt, seed=9, bad_source=0.02, bad_target=0.02, cosmic_rays=5, bad_column="target")
    np.testing.assert_array_equal(base.source_pixels, more.source_pixels)
    np.testing.assert_array_equal(base.target_pixels, more.target_pixels)
    other = add_defects(src, tgt, seed=10, bad_source=0.02, bad_target=0.02)
    assert not np.array_equal(base.source_pixels, other.source_pixels)
    # a generator works as a seed too, and is advanced
    rng = np.random.default_rng(4)
    first = add_defects(src, tgt, seed=rng, bad_source=0.02)
    second = add_defects(src, tgt, seed=rng, bad_source=0.02)
    assert not np.array_equal(first.source_pixels, second.source_pixels)
    assert isinstance(first, Defects)


def test_non_finite_inputs_are_marked() -> None:
    src, tgt = scene(2)
    src[3, 4] = np.nan
    tgt[5, 6] = np.inf
    d = add_defects(src, tgt, seed=0)
    assert d.source_bad[3, 4] and d.source_bad.sum() == 1
    assert d.target_bad[5, 6] and d.target_bad.sum() == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"bad_source": -0.1}, OptionError),
        ({"bad_target": 1.5}, OptionError),
        ({"bad_source": "lots"}, OptionError),
        ({"bad_column": "left"}, OptionError),
        ({"saturation": 0.0}, OptionError),
        ({"saturation": float("nan")}, OptionError),
        ({"cosmic_rays": -1}, OptionError),
        ({"cosmic_rays": 2.5}, OptionError),
        ({"sky": -1.0}, OptionError),
        ({"seed": -3}, OptionError),
    ],
)
def test_bad_options(kwargs: dict, error: type) -> None:
    src, tgt = scene(0)
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(error):
        add_defects(src, tgt, **kwargs)


def test_bad_images() -> None:
    with pytest.raises(InputError, match="same shape"):
        add_defects(np.zeros((4, 4)), np.zeros((4, 5)), seed=0)
    with pytest.raises(InputError, match="2-D"):
        add_defects(np.zeros(4), np.zeros(4), seed=0)
    with pytest.raises(InputError, match="real"):
        add_defects(np.zeros((4, 4), complex), np.zeros((4, 4)), seed=0)
