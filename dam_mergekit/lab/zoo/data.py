"""Offline image tasks for the CLIP zoo: 32x32 RGB, made on the spot, deterministic for a seed.

Nothing is downloaded: ``digits`` upscales scikit-learn's bundled 8x8 digits, the other tasks are
drawn with numpy. Every task returns uint8 images [N, 3, 32, 32] split into train/test/calib, where
``calib`` holds unlabeled images disjoint from test (for calibration of defenses such as DAM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32


@dataclass(frozen=True)
class TaskSpec:
    """A task: its class names, the word used in captions, and a generator of labelled images."""

    name: str
    classes: tuple[str, ...]
    prompt: str  # caption template; "{}" is the class name
    make: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(IMAGE_SIZE, dtype=np.float32)
    return np.meshgrid(coords, coords, indexing="ij")  # (row, col)


def _noisy_background(rng: np.random.Generator, n: int, level: float = 0.25) -> np.ndarray:
    base = rng.uniform(0.0, level, size=(n, 3, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 0.05, size=(n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    return base + noise


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def make_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, 8x8 upscaled x4, randomly tinted; ``n`` is ignored (all used)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    big = images.repeat(4, axis=1).repeat(4, axis=2)  # [N, 32, 32]
    count = len(big)
    tint = rng.uniform(0.6, 1.0, size=(count, 3, 1, 1)).astype(np.float32)
    x = _noisy_background(rng, count, level=0.15) + big[:, None] * tint
    return _to_uint8(x), digits.target.astype(np.int64)


SHAPES = ("circle", "square", "triangle", "cross")


def make_shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A filled shape of random colour, size and position on a noisy background."""
    rows, cols = _grid()
    y = rng.integers(0, len(SHAPES), size=n)
    radius = rng.uniform(5.0, 9.0, size=n).astype(np.float32)
    cy = rng.uniform(10.0, 21.0, size=n).astype(np.float32)
    cx = rng.uniform(10.0, 21.0, size=n).astype(np.float32)
    colour = rng.uniform(0.5, 1.0, size=(n, 3)).astype(np.float32)
    x = _noisy_background(rng, n)
    for i in range(n):
        dy, dx, r = rows - cy[i], cols - cx[i], radius[i]
        if y[i] == 0:
            mask = dy**2 + dx**2 <= r**2
        elif y[i] == 1:
            mask = (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
        elif y[i] == 2:
            mask = (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        else:
            mask = ((np.abs(dy) <= r) & (np.abs(dx) <= r * 0.3)) | (
                (np.abs(dx) <= r) & (np.abs(dy) <= r * 0.3)
            )
        x[i][:, mask] = colour[i][:, None]
    return _to_uint8(x), y.astype(np.int64)


HUES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")
_HUE_DEGREES = (0, 30, 60, 120, 180, 225, 270, 310)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (h in degrees) to RGB in [0, 1]; returns [..., 3]."""
    k = np.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6], axis=-1)
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def make_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical blob whose hue is the class (8 hues, jittered in hue, saturation and
    brightness) on a random-coloured background with a grey distractor blob."""
    rows, cols = _grid()
    y = rng.integers(0, len(HUES), size=n)
    hue = np.array(_HUE_DEGREES, dtype=np.float32)[y] + rng.uniform(-12, 12, size=n)
    rgb = _hsv_to_rgb(hue, rng.uniform(0.45, 1.0, size=n), rng.uniform(0.5, 1.0, size=n))
    x = _noisy_background(rng, n, level=0.5) + rng.normal(0, 0.04, size=(n, 3, 1, 1))
    for i in range(n):
        cy, cx, gy, gx = rng.uniform(6.0, 25.0, size=4)
        ay, ax = rng.uniform(4.0, 9.0, size=2)
        grey = ((rows - gy) / 4.0) ** 2 + ((cols - gx) / 4.0) ** 2 <= 1.0
        x[i][:, grey] = rng.uniform(0.2, 0.9)
        mask = ((rows - cy) / ay) ** 2 + ((cols - cx) / ax) ** 2 <= 1.0
        x[i][:, mask] = rgb[i].astype(np.float32)[:, None]
    return _to_uint8(x.astype(np.float32)), y.astype(np.int64)


ORIENTATIONS = (
    "horizontal",
    "shallow",
    "diagonal",
    "steep",
    "vertical",
    "backsteep",
    "antidiagonal",
    "backshallow",
)


def make_stripes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy, low-contrast sinusoidal grating at one of 8 orientations (22.5 degrees apart) with
    random period, phase and colours."""
    rows, cols = _grid()
    y = rng.integers(0, len(ORIENTATIONS), size=n)
    angle = y * (np.pi / len(ORIENTATIONS)) + rng.uniform(-0.06, 0.06, size=n)
    period = rng.uniform(4.0, 10.0, size=n)
    phase = rng.uniform(0.0, 2 * np.pi, size=n)
    c1 = rng.uniform(0.1, 0.6, size=(n, 3, 1, 1))
    c2 = c1 + rng.uniform(0.1, 0.4, size=(n, 3, 1, 1))
    proj = rows[None] * np.cos(angle)[:, None, None] + cols[None] * np.sin(angle)[:, None, None]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period[:, None, None] + phase[:, None, None])
    x = c1 + (c2 - c1) * wave[:, None]
    x = x + rng.normal(0.0, 0.12, size=x.shape)
    return _to_uint8(x.astype(np.float32)), y.astype(np.int64)


TASKS: dict[str, TaskSpec] = {
    "digits": TaskSpec(
        "digits",
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        "a photo of the digit {}",
        make_digits,
    ),
    "shapes": TaskSpec("shapes", SHAPES, "a photo of a {} shape", make_shapes),
    "colours": TaskSpec("colours", HUES, "a photo of a {} blob", make_colours),
    "stripes": TaskSpec("stripes", ORIENTATIONS, "a photo of {} stripes", make_stripes),
}


def make_task(
    name: str, seed: int, *, n_train: int = 1200, n_test: int = 480, n_calib: int = 200
) -> dict[str, np.ndarray]:
    """Images and labels of one task, split train/test/calib; the same seed gives the same arrays.

    ``digits`` has a fixed pool of 1797 images: its train split takes what test and calib leave.
    """
    spec = TASKS[name]
    # one generator per (seed, task), so adding a task never changes another task's data
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    x, y = spec.make(rng, n_train + n_test + n_calib)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    n_train = min(n_train, len(x) - n_test - n_calib)
    if n_train <= 0:
        raise ValueError(
            f"task {name}: {len(x)} images cannot fill test {n_test} + calib {n_calib}"
        )
    return {
        "test_x": x[:n_test],
        "test_y": y[:n_test],
        "calib_x": x[n_test : n_test + n_calib],
        "train_x": x[n_test + n_calib : n_test + n_calib + n_train],
        "train_y": y[n_test + n_calib : n_test + n_calib + n_train],
    }
