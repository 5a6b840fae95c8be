"""Pathfinder generator: the label rule, snake geometry, determinism, the released layout, resuming."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hopformer.data import load_lra
from hopformer.data.pathfinder import (
    PARAMETERS,
    _header_draws,
    _image_rng,
    add_arguments,
    generate_pathfinder,
    make_sample,
    run_from_args,
)

HARD = "curv_contour_length_14"
EIGHT = np.ones((3, 3), dtype=bool)


@pytest.fixture(scope="module")
def samples():
    return [make_sample(32, HARD, seed=0, index=i) for i in range(40)]


def touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Overlap or 8-neighbour contact between two pixel sets."""
    return bool((ndimage.binary_dilation(a, EIGHT) & b).any())


def linked(lit: np.ndarray, a: np.ndarray, b: np.ndarray, reach: int) -> bool:
    """Are ``a`` and ``b`` connected through ``lit`` pixels, bridging gaps of at most ``reach - 1`` dark
    pixels (components closer than Chebyshev distance ``reach`` count as joined)?"""
    labels, n = ndimage.label(lit, EIGHT)
    grown = [ndimage.binary_dilation(labels == c, EIGHT, iterations=reach) for c in range(1, n + 1)]
    start = set(np.unique(labels[a & lit])) - {0}
    goal = set(np.unique(labels[b & lit])) - {0}
    seen, todo = set(start), list(start)
    while todo:
        c = todo.pop()
        for d in np.unique(labels[grown[c - 1]]):
            if d and d not in seen:
                seen.add(int(d))
                todo.append(int(d))
    return bool(seen & goal)


def test_markers_touch_the_same_target_exactly_when_label_is_one(samples):
    for s in samples:
        first, second = s.marker_snakes
        # each marker sits on the tip of the snake it marks ...
        assert touches(s.marker_masks[0], s.target_masks[first])
        assert touches(s.marker_masks[1], s.target_masks[second])
        # ... and the two share a target iff the label says so
        shared = [touches(s.marker_masks[0], t) and touches(s.marker_masks[1], t) for t in s.target_masks]
        assert any(shared) == (s.label == 1), f"label {s.label}, shared {shared}"
        assert (first == second) == (s.label == 1)


def test_rendered_image_connects_the_markers_through_one_snake_iff_label_one(samples):
    for s in samples:
        lit = s.image > 0
        # the ground truth explains every lit pixel of the picture, and nothing else
        assert np.array_equal(lit, s.target_masks.any(0) | s.marker_masks.any(0) | s.distractor_mask)
        markers = s.marker_masks.any(0)
        # paddles of one snake are at most one dark pixel apart at 32x32 (gap 2 * margin = 2)
        through = [linked(lit & (t | markers), s.marker_masks[0], s.marker_masks[1], reach=2) for t in s.target_masks]
        if s.label == 1:
            assert through[s.marker_snakes[0]]
        else:
            assert not any(through)


def test_markers_are_drawn_at_the_snake_tips(samples):
    for s in samples:
        first, second = s.marker_snakes
        tips = [s.targets[first][0][:2], s.targets[second][-1][2:]]
        for mask, (y, x) in zip(s.marker_masks, tips):
            assert mask[round(y), round(x)]
            assert s.image[round(y), round(x)] == 255  # markers are the brightest ink


def _dense(paddle, step=0.05):
    y0, x0, y1, x1 = paddle
    t = np.linspace(0, 1, int(math.hypot(y1 - y0, x1 - x0) / step) + 2)[:, None]
    return np.array([y0, x0]) + t * np.array([y1 - y0, x1 - x0])


def test_snake_geometry(samples):
    p = PARAMETERS[32]
    for s in samples:
        assert [len(t) for t in s.targets] == [14, 14]
        assert all(len(d) == 14 // 3 for d in s.distractors)
        assert 1 <= s.num_distractors <= 20 // (14 // 3)
        snakes = s.targets + s.distractors
        for snake in snakes:
            for (y0, x0, y1, x1), (v0, w0, v1, w1) in zip(snake, snake[1:]):
                assert math.hypot(y1 - y0, x1 - x0) == pytest.approx(p.paddle_length)
                turn = math.atan2(v1 - v0, w1 - w0) - math.atan2(y1 - y0, x1 - x0)
                turn = abs((turn + math.pi) % (2 * math.pi) - math.pi)
                assert turn < math.pi / 2 / p.continuity  # continuity 1 bounds turns below 90 degrees
                gap = math.hypot(v0 - y1, w0 - x1)
                assert 2 * s.margin * math.cos(turn / 2) - 1e-9 <= gap <= 2 * s.margin + 1e-9
        # occupancy: centre lines of non-consecutive paddles keep thickness + margin (to 1/8 pixel)
        owner = [(k, j) for k, snake in enumerate(snakes) for j in range(len(snake))]
        points = [_dense(pad) for snake in snakes for pad in snake]
        for a in range(len(points)):
            for b in range(a + 1, len(points)):
                if owner[a][0] == owner[b][0] and owner[b][1] - owner[a][1] == 1:
                    continue
                d = np.sqrt(((points[a][:, None] - points[b][None]) ** 2).sum(-1)).min()
                assert d >= p.paddle_thickness + s.margin - 0.125 - 0.05, (owner[a], owner[b], d)
        # snake ink stays inside the image minus the 1-pixel padding band (markers may spill over)
        ink = s.target_masks.any(0) | s.distractor_mask
        assert not ink[0].any() and not ink[-1].any() and not ink[:, 0].any() and not ink[:, -1].any()


def test_labels_are_balanced(samples):
    assert 12 <= sum(s.label for s in samples) <= 28
    p = PARAMETERS[32]
    labels = [_header_draws(_image_rng(0, 32, 14, i), p)[0] for i in range(4000)]
    assert 0.47 <= np.mean(labels) <= 0.53


def test_same_seed_same_image_other_seed_other_image(samples):
    again = make_sample(32, HARD, seed=0, index=3)
    assert np.array_equal(again.image, samples[3].image) and again.label == samples[3].label
    assert not np.array_equal(make_sample(32, HARD, seed=1, index=3).image, samples[3].image)
    assert not np.array_equal(samples[4].image, samples[3].image)


@pytest.mark.parametrize(("resolution", "difficulty", "length"), [(64, "curv_baseline", 6), (128, HARD, 14)])
def test_other_resolutions_keep_the_label_rule(resolution, difficulty, length):
    for index in range(2):
        s = make_sample(resolution, difficulty, seed=0, index=index)
        assert s.image.shape == (resolution, resolution) and s.image.dtype == np.uint8
        assert [len(t) for t in s.targets] == [length, length]
        shared = [touches(s.marker_masks[0], t) and touches(s.marker_masks[1], t) for t in s.target_masks]
        assert any(shared) == (s.label == 1)


def test_lanczos_render_draws_the_same_geometry_with_snakes2_intensities(samples):
    drawn = [make_sample(32, HARD, seed=0, index=i, render="lanczos") for i in range(len(samples))]
    centres = []
    for s, plain in zip(drawn, samples):
        # only the pixels change: the same snakes, markers and label
        assert s.label == plain.label and s.targets == plain.targets and s.distractors == plain.distractors
        assert s.marker_snakes == plain.marker_snakes
        # every lit pixel belongs to some element; Lanczos ringing lights more pixels than coverage does
        assert np.array_equal(s.image > 0, s.target_masks.any(0) | s.marker_masks.any(0) | s.distractor_mask)
        assert (s.image > 0).sum() > (plain.image > 0).sum()
        assert s.image.max() == 255  # snakes2 divides by the image maximum
        first, second = s.marker_snakes
        for y, x in (s.targets[first][0][:2], s.targets[second][-1][2:]):
            centres.append(int(s.image[round(y), round(x)]))
    # snakes2's thin distractors overshoot to the maximum, so the markers come out at ~221
    assert 205 <= np.median(centres) <= 235, np.percentile(centres, [5, 50, 95])
    assert np.mean([c < 250 for c in centres]) > 0.75


def test_a_folder_keeps_one_render(tmp_path):
    folder = generate_pathfinder(tmp_path, n=4, workers=1, progress=False, render="lanczos")
    assert (folder / ".hopformer-render").read_text().strip() == "lanczos"
    image = np.asarray(Image.open(folder / "imgs" / "0" / "sample_2.png"))
    assert np.array_equal(image, make_sample(32, HARD, seed=0, index=2, render="lanczos").image)
    with pytest.raises(ValueError, match="render='coverage'.*render='lanczos'"):
        generate_pathfinder(tmp_path, n=8, workers=1, progress=False)
    generate_pathfinder(tmp_path, n=8, workers=1, progress=False, render="lanczos")  # resuming is fine
    assert len(list((folder / "imgs" / "0").glob("*.png"))) == 8


def _read_metadata(folder):
    rows = {}
    for meta in sorted((folder / "metadata").glob("*.npy")):
        for line in meta.read_text().splitlines():
            columns = line.split(" ")
            rows[(columns[0], columns[1])] = columns
    return rows


def test_generate_writes_the_released_layout_readable_by_load_lra(tmp_path):
    folder = generate_pathfinder(tmp_path / "one", n=30, batch_size=12, workers=1, progress=False)
    assert folder == tmp_path / "one" / "pathfinder32" / HARD
    assert sorted(p.name for p in (folder / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
    assert len(list((folder / "imgs" / "2").glob("*.png"))) == 6
    rows = _read_metadata(folder)
    assert len(rows) == 30
    for index in (0, 13, 29):
        batch, i = divmod(index, 12)
        columns = rows[(f"imgs/{batch}", f"sample_{i}.png")]
        sample = make_sample(32, HARD, seed=0, index=index)
        assert columns == [f"imgs/{batch}", f"sample_{i}.png", str(i), str(sample.label)] + (
            "1.0 14 4 2 0.5 1 1".split()
        )
        with Image.open(folder / "imgs" / str(batch) / f"sample_{i}.png") as image:
            assert image.mode == "L" and image.size == (32, 32)
            assert np.array_equal(np.asarray(image), sample.image)

    # the loader sees every image once, with its label and all pixels as real tokens
    splits = {split: load_lra("pathfinder32", tmp_path / "one", split) for split in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [24, 3, 3]
    by_pixels = {}
    for (subdir, name), columns in rows.items():
        with Image.open(folder / subdir / name) as image:
            by_pixels[np.asarray(image).tobytes()] = int(columns[3])
    seen = set()
    for example in (e for v in splits.values() for e in v):
        key = example["input_ids"].numpy().astype(np.uint8).tobytes()
        assert by_pixels[key] == example["label"]
        assert example["attention_mask"].all()
        seen.add(key)
    assert len(seen) == 30

    # more workers, same bytes
    other = generate_pathfinder(tmp_path / "two", n=30, batch_size=12, workers=2, progress=False)
    for path in folder.rglob("*"):
        if path.is_file():
            assert (other / path.relative_to(folder)).read_bytes() == path.read_bytes(), path


def test_generate_resumes_an_interrupted_run(tmp_path):
    folder = generate_pathfinder(tmp_path, n=20, batch_size=10, workers=1, progress=False)
    kept = folder / "imgs" / "1" / "sample_0.png"
    lost = folder / "imgs" / "1" / "sample_3.png"
    original, metadata = lost.read_bytes(), (folder / "metadata" / "1.npy").read_text()
    done = (folder / "imgs" / "0" / "sample_0.png").stat().st_mtime_ns
    kept_time = kept.stat().st_mtime_ns
    lost.unlink()  # as if interrupted before this image and before batch 1's metadata
    (folder / "metadata" / "1.npy").unlink()
    generate_pathfinder(tmp_path, n=20, batch_size=10, workers=1, progress=False)
    assert lost.read_bytes() == original
    assert (folder / "metadata" / "1.npy").read_text() == metadata
    assert kept.stat().st_mtime_ns == kept_time  # existing images are not redrawn
    assert (folder / "imgs" / "0" / "sample_0.png").stat().st_mtime_ns == done  # finished batch skipped


def test_command_line(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--n", "3", "--difficulty", "curv_baseline", "--workers", "1", "--no-progress"]
    )
    assert run_from_args(args) == 0
    meta = (tmp_path / "pathfinder32" / "curv_baseline" / "metadata" / "0.npy").read_text().splitlines()
    assert [line.split()[5] for line in meta] == ["6", "6", "6"]  # contour length column
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--resolution", "48"])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        make_sample(48)
    with pytest.raises(ValueError, match="difficulty.*curv_baseline"):
        make_sample(32, "hard")
    with pytest.raises(ValueError, match="n must be"):
        generate_pathfinder(tmp_path, n=0, progress=False)
    with pytest.raises(ValueError, match="workers"):
        generate_pathfinder(tmp_path, n=1, workers=0, progress=False)
    with pytest.raises(ValueError, match="render must be one of coverage, lanczos, got 'snakes'"):
        make_sample(32, render="snakes")
    with pytest.raises(ValueError, match="render must be"):
        generate_pathfinder(tmp_path, n=1, progress=False, render="")


def test_large_folders_load_through_a_pixel_cache(tmp_path, monkeypatch):
    from hopformer.data import lra

    generate_pathfinder(tmp_path / "data", n=24, batch_size=10, workers=1, progress=False)
    monkeypatch.setenv("HOPFORMER_CACHE", str(tmp_path / "cache"))
    plain = {split: load_lra("pathfinder32", tmp_path / "data", split) for split in ("train", "val", "test")}
    assert not (tmp_path / "cache").exists()  # small folders are not cached

    monkeypatch.setattr(lra, "PATHFINDER_CACHE_MIN", 10)
    cached = {split: load_lra("pathfinder32", tmp_path / "data", split) for split in ("train", "val", "test")}
    folder = tmp_path / "data" / "pathfinder32" / HARD
    cache = lra.pathfinder_cache_path(folder, 32)
    assert cache.is_file() and np.load(cache).shape == (24, 32 * 32 + 1)
    for split in plain:  # the same examples, in the same order
        assert [e["label"] for e in cached[split]] == [e["label"] for e in plain[split]]
        assert all(torch_equal(a, b) for a, b in zip(cached[split], plain[split]))

    def no_decoding(*args):
        raise AssertionError("a cache hit decodes no PNG")

    monkeypatch.setattr(lra, "_decode_png", no_decoding)
    again = load_lra("pathfinder32", tmp_path / "data", "val")
    assert [e["label"] for e in again] == [e["label"] for e in plain["val"]]

    # new images make a new cache key (the old cache is not used for a changed folder)
    generate_pathfinder(tmp_path / "data", n=30, batch_size=10, workers=1, progress=False)
    assert lra.pathfinder_cache_path(folder, 32) != cache
    with pytest.raises(AssertionError, match="decodes no PNG"):
        load_lra("pathfinder32", tmp_path / "data", "val")


def torch_equal(a: dict, b: dict) -> bool:
    return bool((a["input_ids"] == b["input_ids"]).all() and (a["attention_mask"] == b["attention_mask"]).all())
