"""Which image is sharper, in the estimators and in jobs: directions found, flags, reversed kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from stacks import DIRECTION_IMAGES, make_direction_stack

import pipeline as km
from pipeline import flags as fl
from pipeline.core.estimate import tile_directions
from pipeline.core.sharpness import TARGET_SHARPER_TOLERANCE, direction_flags, image_direction
from pipeline.errors import OptionError
from pipeline.job.config import job_from_dict
from pipeline.job.run import run_job
from pipeline.sim.scenes import gaussian_kernel, survey_tile_pair

K = 15


@pytest.fixture(scope="module")
def tiles() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six 128-px survey tiles, target = Gaussian (FWHM 2.4 px) * source, and that kernel."""
    kernel = gaussian_kernel(K, fwhm=2.4)
    pairs = [survey_tile_pair(seed=seed, kernel=kernel, size=128, psf_fwhm=2.5, star_density=4e-3,
                              galaxy_density=2e-3) for seed in range(6)]
    return np.stack([p.source for p in pairs]), np.stack([p.target for p in pairs]), kernel


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the estimators


def test_a_reversed_fit_is_the_forward_fit_of_the_swapped_pair(tiles):
    src, tgt, kernel = tiles
    forward = km.estimate_kernels(src, tgt, kernel_size=K)
    reverse = km.estimate_kernels(tgt, src, kernel_size=K, direction="reverse")
    auto = km.estimate_kernels(tgt, src, kernel_size=K, direction="auto")
    np.testing.assert_array_equal(forward.direction, 1)
    np.testing.assert_array_equal(reverse.direction, -1)
    np.testing.assert_array_equal(auto.direction, -1)  # the target is the sharper image of every tile
    for name in ("kernels", "flux", "background", "residual", "noise", "snr", "fwhm", "regularization"):
        np.testing.assert_array_equal(getattr(reverse, name), getattr(forward, name), err_msg=name)
        np.testing.assert_array_equal(getattr(auto, name), getattr(forward, name), err_msg=name)
    np.testing.assert_array_equal(reverse.width_difference, -forward.width_difference)
    np.testing.assert_array_equal(reverse.flags, forward.flags)
    assert np.all(forward.width_difference > TARGET_SHARPER_TOLERANCE)
    assert np.median([_rel(k, kernel) for k in forward.kernels]) < 0.1


def test_forcing_the_ill_posed_direction_is_flagged(tiles):
    src, tgt, _ = tiles
    wrong = km.estimate_kernels(tgt, src, kernel_size=K)  # the target is the sharper: a deconvolution
    assert np.all(wrong.flags & fl.TARGET_SHARPER)
    also_wrong = km.estimate_kernels(src, tgt, kernel_size=K, direction="reverse")
    assert np.all(also_wrong.flags & fl.TARGET_SHARPER)
    right = km.estimate_kernels(src, tgt, kernel_size=K)
    assert not np.any(right.flags & (fl.TARGET_SHARPER | fl.NEARLY_EQUAL))


def test_a_pair_of_one_image_is_nearly_equal_and_forward(tiles):
    src, _, _ = tiles
    noisy = src + np.random.default_rng(1).normal(0.0, 5.0, src.shape)
    res = km.estimate_kernels(src, noisy, kernel_size=K, direction="auto")
    np.testing.assert_array_equal(res.direction, 1)
    assert np.all(res.flags & fl.NEARLY_EQUAL)
    assert not np.any(res.flags & fl.TARGET_SHARPER)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from([1, -1]), min_size=6, max_size=6))
def test_any_mix_of_directions_fits_each_tile_as_alone(tiles, directions):
    """Tile i with direction -1 is the forward fit of (target_i, source_i), whatever the other tiles."""
    src, tgt, _ = tiles
    src, tgt = src[:, :64, :64], tgt[:, :64, :64]
    d = np.array(directions, dtype=np.int8)
    mixed = km.estimate_kernels(src, tgt, kernel_size=7, method="welch", direction=d)
    np.testing.assert_array_equal(mixed.direction, d)
    for i in range(len(d)):
        a, b = (src[i], tgt[i]) if d[i] == 1 else (tgt[i], src[i])
        alone = km.estimate_kernels(a[None], b[None], kernel_size=7, method="welch")
        np.testing.assert_array_equal(mixed.kernels[i], alone.kernels[0])
        np.testing.assert_allclose(mixed.flux[i], alone.flux[0], rtol=1e-13)  # a sum: in any order


def test_majority_fits_the_whole_batch_the_way_most_of_its_tiles_go(tiles):
    src, tgt, _ = tiles
    sources = np.concatenate([tgt[:4], src[4:]])  # the first four tiles' targets are the sharper images
    targets = np.concatenate([src[:4], tgt[4:]])
    auto = km.estimate_kernels(sources, targets, kernel_size=K, direction="auto")
    np.testing.assert_array_equal(auto.direction, [-1, -1, -1, -1, 1, 1])
    majority = km.estimate_kernels(sources, targets, kernel_size=K, direction="majority")
    reverse = km.estimate_kernels(sources, targets, kernel_size=K, direction="reverse")
    np.testing.assert_array_equal(majority.direction, -1)
    for name in ("kernels", "flux", "background", "flags", "width_difference"):
        np.testing.assert_array_equal(getattr(majority, name), getattr(reverse, name), err_msg=name)
    assert np.all(majority.flags[4:] & fl.TARGET_SHARPER) and not np.any(majority.flags[:4] & fl.TARGET_SHARPER)
    one = km.estimate_kernels(targets[4:], sources[4:], kernel_size=K, direction="majority")
    np.testing.assert_array_equal(one.direction, -1)  # the last two alone, exchanged: reverse as well


@pytest.mark.parametrize("bad", ["backward", "Auto", 2, [1, 0, 1, 1, 1, 1], 1.0, [1, -1]])
def test_an_unknown_direction_is_refused_naming_the_choices(tiles, bad):
    src, tgt, _ = tiles
    with pytest.raises(OptionError, match="forward.*reverse.*auto"):
        km.estimate_kernels(src, tgt, kernel_size=K, direction=bad)


def test_tiles_too_small_to_measure_are_not_flagged():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(3, 12, 12))
    res = km.estimate_kernels(src, src, kernel_size=3, direction="auto")
    assert np.all(np.isnan(res.width_difference))
    np.testing.assert_array_equal(res.direction, 1)
    assert not np.any(res.flags & (fl.TARGET_SHARPER | fl.NEARLY_EQUAL))


def test_direction_flags_and_image_direction_follow_their_rules():
    diff = np.array([-5.0, -0.5, 0.5, 5.0, np.nan, -5.0])
    err = np.array([0.1, 0.1, 0.1, 0.1, np.nan, 2.0])  # the last: -5 within 3 sigma
    sharpens, nearly = direction_flags(diff, err, 1)
    np.testing.assert_array_equal(sharpens, [True, False, False, False, False, False])
    np.testing.assert_array_equal(nearly, [False, True, True, False, False, True])
    sharpens, _ = direction_flags(diff, err, -1)
    np.testing.assert_array_equal(sharpens, [False, False, False, True, False, False])
    assert image_direction(np.array([-5.0, -5.0, 5.0]), np.zeros(3)) == -1
    assert image_direction(np.array([-5.0, 5.0, 5.0]), np.zeros(3)) == 1
    assert image_direction(np.array([-5.0, 5.0, -0.5, -0.2]), np.zeros(4)) == -1  # a tie: the median's sign
    assert image_direction(np.array([-0.5, -0.2, 0.1]), np.zeros(3)) == -1  # all nearly equal: likewise
    assert image_direction(np.full(4, np.nan), np.full(4, np.nan)) == 1  # nothing measured: forward
    assert tile_directions("auto", 3).tolist() == [1, 1, 1]


# ---- jobs


def _job(tmp_path, name: str, *, swap: bool = False, **kernel) -> dict:
    roles = ("target", "source") if swap else ("source", "target")
    return {
        "input": {"path": str(tmp_path / "stack.zarr"), "source": roles[0], "target": roles[1],
                  "variance": {"source": f"{roles[0]}_variance", "target": f"{roles[1]}_variance"}},
        "tiles": {"size": 128}, "kernel": {"size": K, **kernel},
        "output": {"path": str(tmp_path / f"{name}.zarr")},
        "compute": {"scheduler": "threads", "n_workers": 2},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The direction stack (a forward, a reversed and a crossing image) run by default (auto), with source and
    target exchanged (auto), and forced forward and reverse."""
    tmp = tmp_path_factory.mktemp("direction")
    truth = make_direction_stack(tmp / "stack.zarr", k=K)
    summaries = {name: run_job(job_from_dict(_job(tmp, name, **options)), progress=False)
                 for name, options in (("auto", {}), ("swapped", {"swap": True}),
                                       ("forward", {"direction": "forward"}), ("reverse", {"direction": "reverse"}))}
    return truth, summaries, {name: xr.open_zarr(s.path) for name, s in summaries.items()}


def test_each_image_gets_the_direction_of_the_majority_of_its_tiles(runs):
    _, summaries, ds = runs
    assert list(ds["auto"]["image"].values) == list(DIRECTION_IMAGES)
    np.testing.assert_array_equal(ds["auto"]["direction"].values, [1, -1, 1])
    np.testing.assert_array_equal(ds["swapped"]["direction"].values, [-1, 1, -1])
    np.testing.assert_array_equal(ds["forward"]["direction"].values, [1, 1, 1])
    assert summaries["auto"].images_reversed == 1 and summaries["swapped"].images_reversed == 2
    assert "1 of 3 images reversed" in summaries["auto"].describe()
    assert ds["auto"]["direction"].attrs["flag_meanings"] == "reverse forward"


def test_the_direction_is_found_for_every_tile_whose_fwhms_differ_by_more_than_ten_percent(runs):
    truth, _, ds = runs
    measured = ds["auto"]["width_difference"].values  # (image, y, x)
    expected = np.broadcast_to(truth["width_difference"][:, None, :], measured.shape)
    ratio = np.broadcast_to(truth["fwhm_ratio"][:, None, :], measured.shape)
    clear = np.abs(ratio - 1.0) > 0.10
    assert clear.sum() >= 40
    right = np.sign(measured[clear]) == np.sign(expected[clear])
    assert right.mean() >= 0.99, f"{right.mean():.3f}"
    # and the measure itself: within 3 of its uncertainties or 20 % of the truth
    error = ds["auto"]["width_difference_error"].values
    close = np.abs(measured - expected) <= np.maximum(3 * error, 0.2 * np.abs(expected))
    assert close.mean() >= 0.9


def test_no_target_sharper_flag_where_the_source_is_sharper_and_the_minority_flagged(runs):
    truth, summaries, ds = runs
    flags = ds["auto"]["quality_flag"].values.astype(np.int64)
    sharpens = (flags & fl.TARGET_SHARPER) != 0
    expected = np.broadcast_to(truth["width_difference"][:, None, :], flags.shape)
    direction = ds["auto"]["direction"].values[:, None, None]
    # where the fitted image is the blurrier one (the truth), no tile is flagged
    assert not np.any(sharpens & (direction * expected > 0))
    # the crossing image's minority (target sharper, fitted forward) is flagged beyond the tolerance
    beyond = direction * expected < -(TARGET_SHARPER_TOLERANCE + 1.0)
    assert beyond[2].any() and np.all(sharpens[beyond])
    assert not sharpens[:2].any()
    assert summaries["auto"].tiles_target_sharper == int(sharpens.sum())
    assert summaries["auto"].tiles_nearly_equal == int(np.count_nonzero(flags & fl.NEARLY_EQUAL))
    # flagged tiles are kept out of the image's model
    used = ds["auto"]["model_residual"].values
    assert np.isfinite(ds["auto"]["model_degree"].values).all()
    assert used.shape == flags.shape


def test_auto_fits_each_image_as_if_its_direction_were_known_from_the_start(runs):
    """Blocks go their own tiles' majority way until their image is decided; those that went the other way (the
    crossing image's left ones) are fitted again: each image equals the run forced in its direction, bit for
    bit, model and flags included."""
    _, summaries, ds = runs
    assert summaries["auto"].tiles_refitted > 0 and summaries["forward"].tiles_refitted == 0
    assert "fitted again in their image's direction" in summaries["auto"].describe()
    for image, forced in ((0, "forward"), (1, "reverse"), (2, "forward")):
        for name in ds["auto"].data_vars:
            if "image" in ds["auto"][name].dims and name != "direction":
                np.testing.assert_array_equal(ds["auto"][name].values[image], ds[forced][name].values[image],
                                              err_msg=f"{name} of image {image}")


def test_a_forced_forward_run_flags_the_reversed_image_and_leaves_it_unmodelled(runs):
    _, summaries, ds = runs
    flags = ds["forward"]["quality_flag"].values.astype(np.int64)
    assert np.all(flags[1] & fl.TARGET_SHARPER)
    assert not np.any(flags[0] & fl.TARGET_SHARPER)
    assert int(ds["forward"]["model_degree"].values[1]) == -1
    assert summaries["forward"].tiles_target_sharper >= flags[1].size
    assert "target_sharper" in summaries["forward"].describe()


def test_reversed_kernels_are_as_accurate_as_forward_ones_on_the_same_data(runs):
    """The same images with source and target exchanged: each fitted the other way round, the same kernels bit
    for bit; and against the truth, the reversed image as accurate as the forward one."""
    truth, _, ds = runs
    auto, swapped = ds["auto"], ds["swapped"]
    for name in ("kernel", "flux", "background", "fwhm", "model_coefficient", "model_residual"):
        np.testing.assert_array_equal(swapped[name].values, auto[name].values, err_msg=name)
    np.testing.assert_array_equal(swapped["width_difference"].values, -auto["width_difference"].values)
    kernels = auto["kernel"].values
    errors = {}
    for i, label in enumerate(truth["labels"][:2]):
        errors[label] = np.median([_rel(kernels[i, ty, tx], truth["kernels"][i, tx])
                                   for ty in range(kernels.shape[1]) for tx in range(kernels.shape[2])])
    assert errors["sharper"] < 0.1 and errors["blurrier"] < 0.1, errors
    assert errors["sharper"] <= 1.5 * errors["blurrier"], errors
    # the reversed image's flux scale is source over target (both images have the scene's flux: 1)
    assert abs(float(np.nanmedian(auto["flux"].values[1])) - 1.0) < 0.02


def test_a_run_killed_midway_resumes_to_the_same_result(runs, tmp_path):
    """Blocks stored before their image's direction was decided (their own majority's) are taken as they are
    and fitted again where the image goes the other way: the result equals the uninterrupted run's."""
    from conftest import kill_run_after

    _, summaries, ds = runs
    job = _job(tmp_path, "killed")
    job["input"]["path"] = str(Path(summaries["auto"].path).parent / "stack.zarr")
    job["compute"] = {"scheduler": "synchronous"}
    job["output"]["images_per_shard"] = 1  # blocks written one by one, as they are done
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    done = kill_run_after(job_file, tmp_path / "killed.zarr", blocks=20)
    assert 20 <= done < 48
    from pipeline.io.store import OutputStore

    # an image's direction is written with its model: decided for the images finished, 0 for the others
    stored = OutputStore(str(tmp_path / "killed.zarr")).read_directions()
    assert all(d in (0, final) for d, final in zip(stored, [1, -1, 1])), stored
    summary = run_job(job_from_dict({**job, "output": {**job["output"], "mode": "resume"}}), progress=False)
    assert done <= summary.tiles_skipped < 48  # a block may land between the count and the kill
    resumed = xr.open_zarr(summary.path)
    for name in ds["auto"].data_vars:
        np.testing.assert_array_equal(resumed[name].values, ds["auto"][name].values, err_msg=name)


def test_a_store_of_an_earlier_version_is_not_resumed(runs, tmp_path):
    """Records without the sharpness fields cannot be finished by this version: refused, nothing changed."""
    import shutil

    import zarr

    from pipeline.errors import OptionError as Refused
    from pipeline.io.store import RECORD_FIELDS, consolidate

    _, summaries, _ = runs
    copy = tmp_path / "old.zarr"
    shutil.copytree(summaries["auto"].path, copy)
    records = zarr.open_array(copy / "status" / "records", mode="r+")
    records.attrs["fields"] = [name for name in RECORD_FIELDS if not name.startswith("width_difference")]
    consolidate(str(copy))
    before = sorted((p, p.stat().st_mtime_ns) for p in copy.rglob("*"))
    job = _job(tmp_path, "old")
    job["input"]["path"] = str(Path(summaries["auto"].path).parent / "stack.zarr")
    job["output"]["mode"] = "resume"
    with pytest.raises(Refused, match=r"earlier version of kernelmap .*lack width_difference, "
                                      r"width_difference_error.*output.mode=overwrite"):
        run_job(job_from_dict(job), progress=False)
    assert sorted((p, p.stat().st_mtime_ns) for p in copy.rglob("*")) == before
