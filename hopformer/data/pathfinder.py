"""Pathfinder generator: snakes of paddles, two markers, "are the markers on one snake?" (specs/lra.md §4).

A fresh implementation of the *snakes2* procedure (Kim, Linsley et al., ICLR 2020) that made the LRA
Pathfinder data, written from the description in the spec. One image:

1. draw the label (0 or 1), the paddle margin and which target snake carries the first marker;
2. grow two **target snakes** of ``contour_length`` paddles each, their start tips ``seed_distance``
   apart. A paddle is a segment of ``paddle_length`` x ``paddle_thickness``; the next one starts
   ``2 * margin`` further on and turns by an angle drawn with weight
   ``cos(min(continuity * |turn|, pi / 2)) ** 2`` (``continuity = 1`` keeps turns under 90 degrees).
   Occupancy: a new paddle must keep ``thickness + margin`` between its centre line and every placed
   paddle's (except the one it follows), so no ink enters another paddle's margin;
3. put the two **markers** (discs of ``marker_radius``): the first at the start tip of the chosen
   target, the second at the end tip of the *same* target when the label is 1, of the *other* one
   when it is 0;
4. add ``distractor_budget // distractor_length`` **distractor snakes** of ``contour_length // 3``
   paddles where they fit;
5. render (``render="coverage"``: box-filter coverage of round-ended strokes and discs; or
   ``"lanczos"``: snakes2's supersampled drawing, Lanczos-resized and divided by the image maximum),
   save an 8-bit grayscale PNG and a metadata row in the released 11-column text format.

Layout written by :func:`generate_pathfinder` (the released one)::

    out_root/pathfinder{R}/{difficulty}/imgs/<batch>/sample_<i>.png
    out_root/pathfinder{R}/{difficulty}/metadata/<batch>.npy      (plain text despite the extension)

:func:`make_sample` returns one image with its ground truth (paddles and pixel masks of every snake
and marker). Differences from the reference generator are deliberate and listed in :data:`DEVIATIONS`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DEVIATIONS",
    "DIFFICULTIES",
    "PARAMETERS",
    "PathfinderParams",
    "PathfinderSample",
    "RENDERS",
    "add_arguments",
    "generate_pathfinder",
    "make_sample",
    "run_from_args",
]

# Folder name -> target contour length (number of paddles per target snake).
DIFFICULTIES: dict[str, int] = {
    "curv_baseline": 6,
    "curv_contour_length_9": 9,
    "curv_contour_length_14": 14,
}

# How the geometry becomes pixels (see make_sample).
RENDERS: tuple[str, ...] = ("coverage", "lanczos")

DEVIATIONS: tuple[str, ...] = (
    "Target snakes grow one after the other (the second around the finished first) and a dead end "
    "restarts only that snake; snakes2 grows both in alternation and restarts both (~5x more steps).",
    "Collisions are geometric: centre lines keep paddle_thickness + margin apart (to 1/8 pixel), "
    "instead of thresholding the sum of resized, dilated masks at 1.8; each turn is drawn exactly "
    "from the continuity weights among placements that fit (snakes2: at most 3 weighted picks).",
    "Continuous coordinates. The default render='coverage' inks box-filter coverage of round-ended "
    "strokes and discs, clipped at 1, instead of a 2x supersampled drawing resized with Lanczos and "
    "rescaled by the image maximum. At 32 px that changes two things (measured against a port of "
    "snakes2): Lanczos overshoot makes snakes2's thin distractor paddles the brightest pixels, so its "
    "markers come out at ~221 (a value almost only markers have), coverage's at 255 (shared with "
    "distractors); and its ringing leaves a faint halo (45% of pixels non-zero, coverage 22%). "
    "render='lanczos' draws snakes2's way (markers ~221, 52% non-zero) on the same geometry.",
    "Markers are kept unambiguous: a marker's ink stays farther from the target it does not mark "
    "(and, with label 0, from the other marker) than the widest gap inside one snake, and distractors "
    "keep out of the markers' neighbourhoods; snakes2 can put a marker next to the wrong snake.",
    "A distractor's first paddle is drawn among 16 random (pixel, orientation) candidates per try, "
    "not among the free pixels of a dilated mask.",
    "Every image has its own random stream, seeded by (seed, resolution, contour_length, index), so "
    "the output does not depend on the number of workers and a run can resume.",
)


@dataclass(frozen=True)
class PathfinderParams:
    """One resolution's parameter set (``lra_benchmarks/data/pathfinder.py`` over snakes2 defaults).

    Targets are drawn with contrast ``snake_contrast * paddle_contrast`` and distractors with
    ``snake_contrast`` alone, as the reference does (it passes the snake contrast list as the
    distractors' paddle contrasts). Intensities are clipped to 1 before the 8-bit conversion.
    """

    resolution: int
    padding: int
    paddle_length: int
    paddle_thickness: float
    paddle_margins: tuple[int, ...]
    marker_radius: float
    seed_distance: int
    continuity: float
    distractor_budget: int  # num_distractor_snakes = distractor_budget // distractor_length
    snake_contrast: float
    paddle_contrast: float
    antialias_scale: int = 2
    max_distractor_retrial: int = 4  # snakes2 default; extra tries for each distractor snake


# 64/128/256 keep the snakes2 defaults where LRA does not override them (paddle length 5, padding 22
# and seed distance 27 at 256); "22 / distractor_length" was integer division in the Python 2 original.
PARAMETERS: dict[int, PathfinderParams] = {
    32: PathfinderParams(32, 1, 2, 0.5, (1,), 1.5, 7, 1.0, 20, 2.0, 0.75),
    64: PathfinderParams(64, 1, 5, 1.0, (1,), 2.5, 12, 1.8, 22, 0.8, 1.0),
    128: PathfinderParams(128, 1, 5, 1.5, (2, 3), 3.0, 20, 1.8, 35, 0.9, 1.0),
    256: PathfinderParams(256, 22, 5, 2.0, (3,), 5.0, 27, 1.8, 30, 1.0, 1.0),
}

_MAX_PAIR_ATTEMPTS = 200  # redraws of the target pair before giving up (never reached in practice)
_MAX_SNAKE_ATTEMPTS = 20  # tries for one target snake within a pair attempt
_DISTRACTOR_SEEDS = 16  # random (point, orientation) candidates for a distractor's first paddle

Paddle = tuple[float, float, float, float]  # (y0, x0, y1, x1), in the snake's direction of travel


@dataclass
class PathfinderSample:
    """One rendered image with the ground truth needed to test it.

    Attributes:
        image: uint8 ``(R, R)``, the PNG's pixels.
        label: 1 when both markers sit on the same target snake.
        margin: the paddle margin drawn for this image.
        targets: the two target snakes, each a list of paddles ``(y0, x0, y1, x1)`` in growth order.
        target_masks: bool ``(2, R, R)``, the visible pixels (value >= 1 after rounding) of each target.
        distractor_mask: bool ``(R, R)``, visible pixels of all distractor snakes.
        marker_masks: bool ``(2, R, R)``, visible pixels of the first and second marker.
        marker_snakes: ``(first, second)`` target index whose start / end tip carries each marker.
        num_distractors: distractor snakes actually placed (fewer than asked when space runs out).
        distractors: their paddles, like ``targets``.
    """

    image: np.ndarray
    label: int
    margin: int
    targets: list[list[Paddle]]
    target_masks: np.ndarray
    distractor_mask: np.ndarray
    marker_masks: np.ndarray
    marker_snakes: tuple[int, int]
    num_distractors: int
    distractors: list[list[Paddle]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# geometry: paddles are segments (y0, x0, y1, x1) in continuous pixel coordinates (pixel centres at
# integers); arrays of them have the four coordinates on the last axis and broadcast on the others.


def _point_segment_d2(py: np.ndarray, px: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Squared distance from points to segments (broadcasting)."""
    y0, x0, y1, x1 = seg[..., 0], seg[..., 1], seg[..., 2], seg[..., 3]
    dy, dx = y1 - y0, x1 - x0
    ry, rx = py - y0, px - x0
    t = np.minimum(np.maximum((ry * dy + rx * dx) / np.maximum(dy * dy + dx * dx, 1e-12), 0.0), 1.0)
    ey, ex = ry - t * dy, rx - t * dx
    return ey * ey + ex * ex


def _overlap(lo: np.ndarray | float, hi: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """Length of ``[lo, hi] ∩ [a, b]`` (elementwise, never negative)."""
    return np.maximum(np.minimum(hi, b) - np.maximum(lo, a), 0.0)


class _Canvas:
    """The paddles and keep-out discs placed so far in one image; decides where a new paddle fits.

    A paddle fits when its ink stays inside the image minus the ``padding`` band and its centre line
    keeps ``paddle_thickness + margin`` from every placed paddle (so no ink enters another paddle's
    margin) except the snake's own newest one, which it follows at a ``2 * margin`` gap. Placed
    paddles are represented by points every 1/4 pixel along them, so the clearance holds to 1/8 pixel.
    """

    def __init__(self, p: PathfinderParams, margin: int) -> None:
        self.p = p
        self.margin = margin
        self.clearance = p.paddle_thickness + margin
        half = p.paddle_thickness / 2
        self.low, self.high = p.padding - 0.5 + half, p.resolution - 0.5 - p.padding - half
        self.steps = np.linspace(0.0, 1.0, 4 * p.paddle_length + 1)[:, None]  # points along a paddle
        self.points = np.empty((64 * len(self.steps), 2))
        self.count = 0  # paddles placed; their points are the first count * len(steps) rows
        self.discs: list[tuple[float, float, float]] = []  # (y, x, radius) no paddle may enter

    def add(self, paddle: Paddle) -> None:
        n = len(self.steps)
        if (self.count + 1) * n > len(self.points):
            self.points = np.concatenate([self.points, np.empty_like(self.points)])
        start, end = np.array(paddle[:2]), np.array(paddle[2:])
        self.points[self.count * n : (self.count + 1) * n] = start + self.steps * (end - start)
        self.count += 1

    def fits(self, cand: np.ndarray, follows: int | None = None) -> np.ndarray:
        """Which candidate paddles ``(K, 4)`` fit? -> bool ``(K,)``.

        ``follows`` is the index of the paddle the candidates continue (exempt from the clearance).
        """
        ok = np.all((cand >= self.low) & (cand <= self.high), axis=1)
        n = len(self.steps)
        points = self.points[: self.count * n]
        c = self.clearance
        ys, xs = cand[:, 0::2], cand[:, 1::2]
        # only points inside the candidates' bounding box grown by the clearance can collide
        near = (
            (points[:, 0] > ys.min() - c)
            & (points[:, 0] < ys.max() + c)
            & (points[:, 1] > xs.min() - c)
            & (points[:, 1] < xs.max() + c)
        )
        if follows is not None:
            near[follows * n : (follows + 1) * n] = False
        if near.any():
            q = points[near]
            ok &= (_point_segment_d2(q[None, :, 0], q[None, :, 1], cand[:, None, :]) >= c * c).all(axis=1)
        for y, x, radius in self.discs:
            ok &= _point_segment_d2(y, x, cand) >= radius * radius
        return ok


def _turn_grid(p: PathfinderParams, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate turns and their continuity weights ``cos(min(c |turn|, pi/2))^2`` (zeros dropped)."""
    step = 0.5 / (2 * margin + p.paddle_length)  # half a pixel of arc at the far end of a step
    limit = min(math.pi, math.pi / (2 * p.continuity))
    n = int(limit / step)
    turns = np.arange(-n, n + 1) * step
    turns = turns[np.abs(turns) < limit]
    weights = np.cos(np.minimum(p.continuity * np.abs(turns), math.pi / 2)) ** 2
    return turns, weights


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int | None:
    """An index drawn with probability proportional to ``weights``; None if they are all zero."""
    cumulative = np.cumsum(weights)
    if cumulative[-1] <= 0:
        return None
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(weights) - 1)


def _first_paddles(tails: np.ndarray, angles: np.ndarray, length: float) -> np.ndarray:
    """Candidate first paddles ``(K, 4)`` from tail points ``(K, 2)`` along ``angles (K,)``."""
    ends = tails + length * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.concatenate([tails, ends], axis=1)


def _grow_snake(
    canvas: _Canvas, seeds: np.ndarray, length: int, turns: np.ndarray, weights: np.ndarray, rng
) -> list[Paddle] | None:
    """Grow a snake of ``length`` paddles from one of the candidate first paddles ``seeds``.

    Each next paddle starts ``2 * margin`` past the previous one and turns by an angle drawn from the
    continuity weights among the placements that fit. All or nothing: on a dead end the canvas is
    restored and None returned.
    """
    k = _draw(canvas.fits(seeds).astype(float), rng)
    if k is None:
        return None
    start = canvas.count
    paddles: list[Paddle] = [tuple(float(v) for v in seeds[k])]
    canvas.add(paddles[0])
    m, length_ = canvas.margin, canvas.p.paddle_length
    for _ in range(length - 1):
        y0, x0, y1, x1 = paddles[-1]
        heading = math.atan2(y1 - y0, x1 - x0)
        # the 2 * margin gap is split at the joint: margin along the old heading, margin along the new
        jy, jx = y1 + m * math.sin(heading), x1 + m * math.cos(heading)
        angles = heading + turns
        uy, ux = np.sin(angles), np.cos(angles)
        sy, sx = jy + m * uy, jx + m * ux
        cand = np.stack([sy, sx, sy + length_ * uy, sx + length_ * ux], axis=1)
        k = _draw(weights * canvas.fits(cand, follows=canvas.count - 1), rng)
        if k is None:
            canvas.count = start  # take the partial snake away
            return None
        paddles.append(tuple(float(v) for v in cand[k]))
        canvas.add(paddles[-1])
    return paddles


# ----------------------------------------------------------------------------------------------------
# rendering


def _window(y: float, x: float, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres of the square of half-side ``ceil(half)`` around (y, x)."""
    h = math.ceil(half)
    ys = np.arange(round(y) - h, round(y) + h + 1, dtype=np.float64)
    xs = np.arange(round(x) - h, round(x) + h + 1, dtype=np.float64)
    return ys[:, None], xs[None, :]


def _blend(out: np.ndarray, gy: np.ndarray, gx: np.ndarray, value: np.ndarray) -> None:
    """``out = max(out, value)`` on the window's pixels that lie inside ``out``."""
    iy, ix = gy[:, 0].astype(np.intp), gx[0].astype(np.intp)
    rows = (iy >= 0) & (iy < out.shape[0])
    cols = (ix >= 0) & (ix < out.shape[1])
    region = np.ix_(iy[rows], ix[cols])
    out[region] = np.maximum(out[region], value[np.ix_(rows, cols)])


def _snake_ink(p: PathfinderParams, paddles: list[Paddle], out: np.ndarray | None = None) -> np.ndarray:
    """Max-blend the anti-aliased ink of a snake's paddles into ``out`` (a new canvas by default).

    A paddle is a stroke of width ``paddle_thickness`` with round ends; a pixel's ink is the
    box-filter coverage across the stroke, ``|[d - 0.5, d + 0.5] ∩ [-t/2, t/2]|`` at distance ``d``
    from the centre line (exact for axis-aligned strokes, a close approximation otherwise).
    """
    if out is None:
        out = np.zeros((p.resolution, p.resolution))
    if not paddles:
        return out
    seg = np.asarray(paddles)
    half_t = p.paddle_thickness / 2
    # all paddles at once, on the snake's bounding box
    y0 = max(0, math.floor(seg[:, 0::2].min() - half_t - 1))
    y1 = min(p.resolution - 1, math.ceil(seg[:, 0::2].max() + half_t + 1))
    x0 = max(0, math.floor(seg[:, 1::2].min() - half_t - 1))
    x1 = min(p.resolution - 1, math.ceil(seg[:, 1::2].max() + half_t + 1))
    gy = np.arange(y0, y1 + 1, dtype=np.float64)[None, :, None]
    gx = np.arange(x0, x1 + 1, dtype=np.float64)[None, None, :]
    d = np.sqrt(_point_segment_d2(gy, gx, seg[:, None, None, :]))
    cover = _overlap(d - 0.5, d + 0.5, -half_t, half_t).max(axis=0)
    region = out[y0 : y1 + 1, x0 : x1 + 1]
    np.maximum(region, cover, out=region)
    return out


def _disc_ink(centre: tuple[float, float], radius: float, out: np.ndarray) -> None:
    """Max-blend an anti-aliased disc (coverage ``clip(radius + 0.5 - distance, 0, 1)``) into ``out``."""
    gy, gx = _window(centre[0], centre[1], radius + 1)
    _blend(out, gy, gx, np.clip(radius + 0.5 - np.hypot(gy - centre[0], gx - centre[1]), 0.0, 1.0))


def _lanczos_ink(p: PathfinderParams, paddles: list[Paddle], discs: Sequence[tuple[float, float]] = ()) -> np.ndarray:
    """snakes2's drawing: hard-edged ink at about ``antialias_scale`` times the size, Lanczos-resized.

    As snakes2 does, each paddle is drawn on its own small canvas centred on the paddle's first
    pixel: ``2 s r + 1`` big pixels resized to ``2 r + 1`` (``r = length + ceil(thickness) + margin``,
    ``s = antialias_scale``), with a stroke ``round(thickness * s)`` big pixels wide. That ratio
    puts the stroke's start on a pixel centre, so a thin stroke peaks at ~0.58 (contrast 2
    overshoots 1); the Lanczos kernel leaves faint ringing around all ink. A disc (marker) covers
    the big pixels within ``marker_radius * s`` of its centre on a canvas of exactly ``s`` times the
    size. Returns the max-blend of all of them, in [0, 1].
    """
    from PIL import Image, ImageDraw

    s, size = p.antialias_scale, p.resolution
    out = np.zeros((size, size))
    r = p.paddle_length + math.ceil(p.paddle_thickness) + max(p.paddle_margins)
    small, big = 2 * r + 1, 2 * s * r + 1
    ratio = big / small
    width = max(1, round(p.paddle_thickness * s))
    for y0, x0, y1, x1 in paddles:
        cy, cx = round(y0), round(x0)
        # a small pixel centre u (relative to the canvas centre) sits at big pixel s * r + u * ratio
        ends = [(s * r + (x - cx) * ratio, s * r + (y - cy) * ratio) for y, x in ((y0, x0), (y1, x1))]
        mini = Image.new("L", (big, big), 0)
        ImageDraw.Draw(mini).line(ends, fill=255, width=width)
        ink = np.asarray(mini.resize((small, small), Image.LANCZOS), dtype=np.float64) / 255
        gy = np.arange(cy - r, cy + r + 1, dtype=np.float64)[:, None]
        gx = np.arange(cx - r, cx + r + 1, dtype=np.float64)[None, :]
        _blend(out, gy, gx, ink)
    if discs:
        # a small pixel centre y is the big point s * y + (s - 1) / 2
        gy, gx = np.mgrid[0 : size * s, 0 : size * s].astype(np.float64) - (s - 1) / 2
        pixels = np.zeros((size * s, size * s), dtype=np.uint8)
        for cy, cx in discs:
            pixels[np.hypot(gy - s * cy, gx - s * cx) <= p.marker_radius * s] = 255
        resized = np.asarray(Image.fromarray(pixels).resize((size, size), Image.LANCZOS), dtype=np.float64) / 255
        np.maximum(out, resized, out=out)
    return out


def _visible(intensity: np.ndarray) -> np.ndarray:
    """Pixels that survive the 8-bit conversion (round(255 * v) >= 1)."""
    return intensity * 255 >= 0.5


def _near(a: np.ndarray, b: np.ndarray, steps: int) -> bool:
    """Is some pixel of ``b`` within Chebyshev distance ``steps`` of a pixel of ``a``?"""
    grown = a.copy()
    for _ in range(steps):
        row = grown.copy()
        grown[1:] |= row[:-1]
        grown[:-1] |= row[1:]
        col = grown.copy()
        grown[:, 1:] |= col[:, :-1]
        grown[:, :-1] |= col[:, 1:]
    return bool((grown & b).any())


# ----------------------------------------------------------------------------------------------------
# one image


def _image_rng(seed: int, resolution: int, contour_length: int, index: int) -> np.random.Generator:
    # resolution and contour length are mixed in so that folders made with one seed are independent
    return np.random.default_rng(np.random.SeedSequence([seed, resolution, contour_length, index]))


def _header_draws(rng: np.random.Generator, p: PathfinderParams) -> tuple[int, int, int]:
    """The first draws of every image: label, margin and the target that gets the first marker.

    They come first so that a resumed run can rebuild the metadata row of an existing image cheaply.
    """
    label = int(rng.integers(2))
    margin = int(p.paddle_margins[rng.integers(len(p.paddle_margins))])
    origin = int(rng.integers(2))
    return label, margin, origin


def _marker_clearance(p: PathfinderParams, margin: int) -> int:
    """How far (Chebyshev, in pixels) a marker's ink stays from ink it must not touch.

    One more than the widest dark gap between two paddles of one snake (``2 margin`` between paddle
    ends, less the ink that spills past each round end), so that in the picture a marker is never
    closer to the wrong snake than the paddles of one snake are to each other.
    """
    return max(1, math.ceil(2 * margin - p.paddle_thickness - 1)) + 1


@dataclass
class _Targets:
    paddles: list[list[Paddle]]  # the two target snakes
    inks: list[np.ndarray]  # their coverage
    markers: list[np.ndarray]  # coverage of the first and the second marker
    tips: list[tuple[float, float]]  # centres of the markers


def _grow_targets(canvas: _Canvas, contour_length: int, owners: tuple[int, int], rng) -> _Targets | None:
    """Two target snakes whose start tips are ``seed_distance`` apart, and their markers.

    ``owners`` says which snake carries the first marker (at its start tip) and the second (at its
    end tip). The first snake is grown to full length, then the second around it (snakes2 grows them
    in alternation and restarts both at any dead end; growing them in turn needs ~5x fewer steps).
    A marker's ink keeps :func:`_marker_clearance` from the snake it does not mark and, when the markers
    sit on different snakes, from the other marker; the second snake is redrawn until that holds.
    Returns None when no pair was found (the caller starts again on a fresh canvas).
    """
    p = canvas.p
    turns, weights = _turn_grid(p, canvas.margin)
    clearance = _marker_clearance(p, canvas.margin)
    contrast = p.snake_contrast * p.paddle_contrast
    # snakes2 keeps the first seed 2 * seed_distance away from the borders
    lo, hi = 2 * p.seed_distance, p.resolution - 1 - 2 * p.seed_distance
    if lo > hi:
        lo, hi = p.padding, p.resolution - 1 - p.padding
    first = None
    for _ in range(_MAX_SNAKE_ATTEMPTS):
        tail = rng.integers(lo, hi + 1, size=(1, 2)).astype(np.float64)
        seeds = _first_paddles(tail, rng.uniform(-math.pi, math.pi, 1), p.paddle_length)
        first = _grow_snake(canvas, seeds, contour_length, turns, weights, rng)
        if first is not None:
            break
    if first is None:
        return None
    first_ink = _snake_ink(p, first)
    # keep the second snake away from the first snake's markers (a cheap filter; exact test below)
    keep_out = p.marker_radius + 0.5 + clearance + p.paddle_thickness / 2
    for i, where in ((0, first[0][:2]), (1, first[-1][2:])):
        if owners[i] == 0:
            canvas.discs.append((*where, keep_out))
    start = canvas.count
    tail1 = np.array(first[0][:2])
    for _ in range(_MAX_SNAKE_ATTEMPTS):
        phi = rng.uniform(-math.pi, math.pi)
        tail = np.round(tail1 + p.seed_distance * np.array([math.sin(phi), math.cos(phi)]))[None]
        seeds = _first_paddles(tail, rng.uniform(-math.pi, math.pi, 1), p.paddle_length)
        second = _grow_snake(canvas, seeds, contour_length, turns, weights, rng)
        if second is None:
            continue
        snakes, inks = [first, second], [first_ink, _snake_ink(p, second)]
        tips = [snakes[owners[0]][0][:2], snakes[owners[1]][-1][2:]]
        markers = [np.zeros((p.resolution, p.resolution)) for _ in tips]
        for tip, ink in zip(tips, markers):
            _disc_ink(tip, p.marker_radius, ink)
        seen = [_visible(np.minimum(contrast * ink, 1.0)) for ink in inks]
        marks = [_visible(ink) for ink in markers]
        clear = not any(_near(marks[i], seen[1 - owners[i]], clearance) for i in range(2))
        if owners[0] != owners[1]:
            clear = clear and not _near(marks[0], marks[1], clearance)
        if clear:
            return _Targets(snakes, inks, markers, tips)
        canvas.count = start  # take the second snake away and try another
    return None


def make_sample(
    resolution: int = 32,
    difficulty: str = "curv_contour_length_14",
    seed: int = 0,
    index: int = 0,
    render: str = "coverage",
) -> PathfinderSample:
    """Render image ``index`` of the stream ``seed`` (the same pixels :func:`generate_pathfinder` saves).

    ``render`` picks how the geometry becomes pixels (:data:`RENDERS`): ``"coverage"``, exact box-filter
    ink clipped at 1; or ``"lanczos"``, snakes2's own way (ink drawn at twice the size, Lanczos-resized,
    the image divided by its maximum), which gives the released data's intensities: markers ~221 (a
    value almost only they have), faint ringing around every stroke. The geometry is the same.

    Raises:
        ValueError: for an unknown resolution, difficulty or render.
        RuntimeError: if no valid target pair is found (does not happen with the shipped parameters).
    """
    p = _params(resolution)
    contour_length = _contour_length(difficulty)
    if render not in RENDERS:
        raise ValueError(f"render must be one of {', '.join(RENDERS)}, got {render!r}")
    rng = _image_rng(seed, resolution, contour_length, index)
    label, margin, origin = _header_draws(rng, p)
    owners = (origin, origin if label == 1 else 1 - origin)
    for _ in range(_MAX_PAIR_ATTEMPTS):
        canvas = _Canvas(p, margin)
        targets = _grow_targets(canvas, contour_length, owners, rng)
        if targets is not None:
            break
    else:
        raise RuntimeError(f"no valid target pair after {_MAX_PAIR_ATTEMPTS} attempts ({p})")

    # distractors: all or nothing each, a few tries each (snakes2), and never near a marker
    clearance = _marker_clearance(p, margin)
    canvas.discs = [(*tip, p.marker_radius + p.paddle_thickness / 2 + 1 + clearance) for tip in targets.tips]
    distractor_length = contour_length // 3
    turns, weights = _turn_grid(p, margin)
    distractors: list[list[Paddle]] = []
    for _ in range(p.distractor_budget // distractor_length):
        for _ in range(p.max_distractor_retrial + 1):
            tails = rng.integers(p.padding, p.resolution - p.padding, size=(_DISTRACTOR_SEEDS, 2))
            angles = rng.uniform(-math.pi, math.pi, _DISTRACTOR_SEEDS)
            seeds = _first_paddles(tails.astype(np.float64), angles, p.paddle_length)
            snake = _grow_snake(canvas, seeds, distractor_length, turns, weights, rng)
            if snake is not None:
                distractors.append(snake)
                break
    distractor_ink = np.zeros((p.resolution, p.resolution))
    for snake in distractors:
        _snake_ink(p, snake, distractor_ink)

    contrast = p.snake_contrast * p.paddle_contrast
    if render == "coverage":
        inks = [*targets.inks, distractor_ink, *targets.markers]
    else:
        every_distractor = [paddle for snake in distractors for paddle in snake]
        inks = [_lanczos_ink(p, snake) for snake in targets.paddles] + [_lanczos_ink(p, every_distractor)]
        inks += [_lanczos_ink(p, [], [tip]) for tip in targets.tips]
    # layers: target 1, target 2, distractors, marker 1, marker 2
    layers = [contrast * inks[0], contrast * inks[1], p.snake_contrast * inks[2], inks[3], inks[4]]
    # coverage clips at 1; snakes2 divides by the image maximum
    top = 1.0 if render == "coverage" else max(float(layer.max()) for layer in layers)
    layers = [np.clip(layer / top, 0.0, 1.0) for layer in layers]
    image = np.rint(np.maximum.reduce(layers) * 255).astype(np.uint8)
    return PathfinderSample(
        image=image,
        label=label,
        margin=margin,
        targets=targets.paddles,
        target_masks=np.stack([_visible(layer) for layer in layers[:2]]),
        distractor_mask=_visible(layers[2]),
        marker_masks=np.stack([_visible(layer) for layer in layers[3:]]),
        marker_snakes=owners,
        num_distractors=len(distractors),
        distractors=distractors,
    )


# ----------------------------------------------------------------------------------------------------
# writing the released layout


def _params(resolution: int) -> PathfinderParams:
    if resolution not in PARAMETERS:
        raise ValueError(f"resolution must be one of {sorted(PARAMETERS)}, got {resolution!r}")
    return PARAMETERS[resolution]


def _contour_length(difficulty: str) -> int:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    return DIFFICULTIES[difficulty]


def _metadata_row(p: PathfinderParams, difficulty: str, batch: int, i: int, label: int, margin: int) -> str:
    """The released 11 columns: subdir, file, index, label, continuity, contour length, distractor
    length, paddle length, paddle thickness, paddle margin, number of paddle contrasts."""
    contour_length = DIFFICULTIES[difficulty]
    columns = [
        f"imgs/{batch}",
        f"sample_{i}.png",
        i,
        label,
        float(p.continuity),
        contour_length,
        contour_length // 3,
        p.paddle_length,
        p.paddle_thickness,
        margin,
        1,
    ]
    return " ".join(str(c) for c in columns)


def _metadata_rows(path: Path) -> int | None:
    """Rows of a metadata file written by the generator, or None when there is none."""
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written image


def _generate_chunk(job: tuple) -> list[tuple[int, int, int]]:
    """Worker: make (or, when present, skip) images; return ``(global_index, label, margin)`` rows."""
    folder, resolution, difficulty, seed, batch_size, render, indices = job
    p = PARAMETERS[resolution]
    contour_length = DIFFICULTIES[difficulty]
    rows = []
    for index in indices:
        batch, i = divmod(index, batch_size)
        path = Path(folder) / "imgs" / str(batch) / f"sample_{i}.png"
        if path.is_file() and path.stat().st_size > 0:
            label, margin, _ = _header_draws(_image_rng(seed, resolution, contour_length, index), p)
        else:
            sample = make_sample(resolution, difficulty, seed, index, render)
            _write_png(path, sample.image)
            label, margin = sample.label, sample.margin
        rows.append((index, label, margin))
    return rows


def generate_pathfinder(
    out_root: str | os.PathLike,
    resolution: int = 32,
    difficulty: str = "curv_contour_length_14",
    n: int = 200_000,
    seed: int = 0,
    workers: int | None = None,
    batch_size: int = 1000,
    progress: bool = True,
    render: str = "coverage",
) -> Path:
    """Write ``n`` Pathfinder images and their metadata in the released LRA layout.

    Args:
        out_root: folder that receives ``pathfinder{resolution}/{difficulty}/``.
        resolution: 32, 64, 128 (Path-X) or 256; picks the parameter set in :data:`PARAMETERS`.
        difficulty: ``curv_baseline`` (6 paddles), ``curv_contour_length_9`` or
            ``curv_contour_length_14`` (the LRA "hard" set).
        n: number of images (the release has 200,000 per folder).
        seed: stream seed; image ``k`` depends only on (seed, resolution, difficulty, k).
        workers: processes (default: all CPUs); 1 runs in this process.
        batch_size: images per ``imgs/<batch>/`` folder and per metadata file (1000 in the release).
        progress: show a tqdm bar.
        render: ``"coverage"`` or ``"lanczos"`` (snakes2's intensities); see :func:`make_sample`. It is
            recorded in ``.hopformer-render`` in the folder so that a resumed run cannot mix the two.

    Images already on disk are kept (their metadata rows are rebuilt from the seed), and batches
    whose metadata file lists all their images are skipped, so an interrupted run resumes where it
    stopped, and a larger ``n`` adds images to an existing folder. A metadata
    file is written, atomically, only once its whole batch is on disk.

    Returns:
        The difficulty folder ``out_root/pathfinder{R}/{difficulty}``.
    """
    p = _params(resolution)
    _contour_length(difficulty)
    for name, value in (("n", n), ("batch_size", batch_size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, got {value!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")

    if render not in RENDERS:
        raise ValueError(f"render must be one of {', '.join(RENDERS)}, got {render!r}")

    folder = Path(out_root) / f"pathfinder{resolution}" / difficulty
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    stamp = folder / ".hopformer-render"
    earlier = stamp.read_text().strip() if stamp.is_file() else ("coverage" if any(folder.glob("imgs/*")) else None)
    if earlier is not None and earlier != render:
        raise ValueError(f"render={render!r}, but {folder} holds images drawn with render={earlier!r}")
    stamp.write_text(render + "\n")
    n_batches = -(-n // batch_size)
    todo: dict[int, list[int]] = {}
    for batch in range(n_batches):
        size = min((batch + 1) * batch_size, n) - batch * batch_size
        if _metadata_rows(folder / "metadata" / f"{batch}.npy") == size:
            continue  # finished in an earlier run (a shorter last batch of a smaller n is completed)
        (folder / "imgs" / str(batch)).mkdir(parents=True, exist_ok=True)
        todo[batch] = list(range(batch * batch_size, min((batch + 1) * batch_size, n)))

    chunk = 50  # images per task: large enough to amortise IPC, small enough for a lively bar
    jobs = [
        (str(folder), resolution, difficulty, seed, batch_size, render, indices[k : k + chunk])
        for indices in todo.values()
        for k in range(0, len(indices), chunk)
    ]
    rows: dict[int, list[tuple[int, int, int]]] = {batch: [] for batch in todo}

    from tqdm import tqdm

    total = sum(len(v) for v in todo.values())
    bar = tqdm(total=n, initial=n - total, disable=not progress, desc=f"pathfinder{resolution}/{difficulty}")

    def collect(result: list[tuple[int, int, int]]) -> None:
        batch = result[0][0] // batch_size
        rows[batch].extend(result)
        bar.update(len(result))
        if len(rows[batch]) == len(todo[batch]):
            lines = [
                _metadata_row(p, difficulty, batch, index % batch_size, label, margin)
                for index, label, margin in sorted(rows[batch])
            ]
            target = folder / "metadata" / f"{batch}.npy"
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text("\n".join(lines) + "\n")
            os.replace(tmp, target)

    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                collect(_generate_chunk(job))
        else:
            import multiprocessing

            with multiprocessing.Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(_generate_chunk, jobs):
                    collect(result)
    finally:
        bar.close()
    return folder


# ----------------------------------------------------------------------------------------------------
# command line: `hopformer data pathfinder ...` (hopformer/cli/data.py calls these two)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hopformer data pathfinder`` options to ``parser``."""
    parser.add_argument("--out", required=True, help="output root; receives pathfinder{R}/{difficulty}/")
    parser.add_argument("--resolution", type=int, default=32, choices=sorted(PARAMETERS), help="image side")
    parser.add_argument(
        "--difficulty", default="curv_contour_length_14", choices=list(DIFFICULTIES), help="difficulty folder"
    )
    parser.add_argument("--n", type=int, default=200_000, help="number of images (release: 200000)")
    parser.add_argument("--seed", type=int, default=0, help="random stream seed")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per imgs/<batch>/ folder")
    parser.add_argument(
        "--render", default="coverage", choices=RENDERS, help="how geometry becomes pixels (lanczos: snakes2's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the generator from parsed :func:`add_arguments` options; returns the exit status."""
    import sys
    import time

    start = time.perf_counter()
    try:
        folder = generate_pathfinder(
            args.out,
            resolution=args.resolution,
            difficulty=args.difficulty,
            n=args.n,
            seed=args.seed,
            workers=args.workers,
            batch_size=getattr(args, "batch_size", 1000),
            progress=not getattr(args, "no_progress", False),
            render=getattr(args, "render", "coverage"),
        )
    except ValueError as error:
        print(f"hopformer data pathfinder: {error}", file=sys.stderr)
        return 2
    print(f"{args.n} images in {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hopformer.data.pathfinder", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(_main())
