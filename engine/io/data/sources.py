"""Built-in generated data sets: offline, deterministic under a seed, each a learnable task.

Keys, shapes and dtypes (N = ``samples``):

=================  ================================  ===================================
source             x                                 y
=================  ================================  ===================================
sine, series       [N, length, 1] float32            [N, 1] float32 (value horizon ahead)
spirals, xor       [N, 2] float32                    [N] int32 class
gaussian_mixture   [N, 2] float32                    (none)
adding             [N, length, 2] float32            [N, 1] float32 (sum of marked values);
                                                      with min_length also mask [N, length]
parity             [N, length, 1] float32 bits       [N] int32 parity
sequence_task      [N, length] int32 tokens          [N, length] int32 tokens
images             [N, channels, size, size] float32 [N] int32 class
=================  ================================  ===================================
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from dlgraph.engine.io.data.base import (
    Arrays,
    DataSource,
    length_field,
    samples_field,
    source_field,
)

F32 = np.float32
TAU = 2 * math.pi


# ------------------------------------------------------------------ shared helpers

def _uniform(rng: np.random.Generator, lo: float, hi: float, *shape: int) -> np.ndarray:
    return rng.uniform(lo, hi, size=shape)


def _balanced(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """Class labels whose counts differ by at most one, in random order."""
    return rng.permutation(np.arange(n) % classes).astype(np.int32)


def _windows(values: np.ndarray, length: int, horizon: int, noise: float,
             rng: np.random.Generator) -> Arrays:
    """Series ``values`` [N, length + horizon] -> the first ``length`` steps as x (plus
    observation noise) and the clean value ``horizon`` steps after the window as y."""
    x = values[:, :length] + noise * rng.standard_normal((len(values), length))
    y = values[:, length + horizon - 1:length + horizon]
    return {"x": x[..., None].astype(F32), "y": y.astype(F32)}


def _noise_field(default: float, what: str) -> Any:
    return Field(default, ge=0.0, description=what)


# ------------------------------------------------------------------ time series

class _Windowed(DataSource):
    """Fields shared by the time-series sources."""

    samples: int = samples_field()
    length: int = length_field(32)
    horizon: int = Field(1, ge=1, description="How many steps after the window y lies.")
    noise: float = _noise_field(0.0, "Std of Gaussian noise added to the inputs "
                                     "(the target stays clean).")

    def scratch_bytes(self) -> float:  # float64 values, noise and x, and AR(2)'s burn-in
        return 8.0 * 4 * self.samples * (self.length + self.horizon + 100)


class Sine(_Windowed):
    """Windows of a sum of two sines (random frequency, phase, amplitude); predict ahead."""

    source: Literal["sine"] = source_field("sine")
    example = ({"length": 16}, {"x": (60, 16, 1), "y": (60, 1)})  # its test

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        n, t = self.samples, np.arange(self.length + self.horizon)
        freq = _uniform(rng, 1 / 32, 1 / 8, n, 2, 1)  # cycles per step: periods of 8-32 steps
        phase = _uniform(rng, 0, TAU, n, 2, 1)
        amp = np.stack([_uniform(rng, 0.4, 0.6, n), _uniform(rng, 0.15, 0.35, n)], 1)[..., None]
        values = (amp * np.sin(TAU * freq * t + phase)).sum(1)  # |values| < 0.95
        return _windows(values, self.length, self.horizon, self.noise, rng)


class Series(_Windowed):
    """Windows of a sawtooth, square wave or AR(2) process (random per sample); predict ahead."""

    source: Literal["series"] = source_field("series")
    example = ({"kind": "ar", "length": 12}, {"x": (60, 12, 1), "y": (60, 1)})  # its test
    kind: Literal["sawtooth", "square", "ar"] = Field(
        "sawtooth", description="sawtooth/square: random whole period (8-24 steps) and phase; "
                                "ar: a stable oscillating AR(2) process with std 0.3.")

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        n, steps = self.samples, self.length + self.horizon
        if self.kind == "ar":
            values = _ar2(rng, n, steps)
        else:
            period = rng.integers(8, 25, size=(n, 1))  # whole steps: exactly periodic samples
            cycles = (np.arange(steps) + rng.integers(0, period)) / period
            amp = _uniform(rng, 0.5, 0.9, n, 1)
            if self.kind == "sawtooth":
                values = amp * (2 * (cycles % 1.0) - 1)
            else:
                values = amp * np.where(cycles % 1.0 < 0.5, 1.0, -1.0)
        return _windows(values, self.length, self.horizon, self.noise, rng)


def _ar2(rng: np.random.Generator, n: int, steps: int, burn_in: int = 100) -> np.ndarray:
    """x_t = a1 x_{t-1} + a2 x_{t-2} + e_t with poles r e^{+-i theta}, scaled to std 0.3."""
    r, theta = _uniform(rng, 0.9, 0.98, n), TAU / _uniform(rng, 8, 32, n)
    a1, a2 = 2 * r * np.cos(theta), -r * r
    var = (1 - a2) / ((1 + a2) * ((1 - a2) ** 2 - a1 ** 2))  # stationary variance for e ~ N(0,1)
    e = rng.standard_normal((burn_in + steps, n)) * (0.3 / np.sqrt(var))
    out = np.zeros((burn_in + steps, n))
    for t in range(2, burn_in + steps):  # a loop over time, vectorised over samples
        out[t] = a1 * out[t - 1] + a2 * out[t - 2] + e[t]
    return out[burn_in:].T


# ------------------------------------------------------------------ 2-D point sets

class Spirals(DataSource):
    """Interleaved 2-D spiral arms, one per class (cs231n style); x in the unit disc."""

    source: Literal["spirals"] = source_field("spirals")
    example = ({}, {"x": (60, 2), "y": (60,)})  # its test
    samples: int = samples_field()
    classes: int = Field(3, ge=2, description="Number of spiral arms (classes).")
    turns: float = Field(1.0, gt=0, description="How many turns each arm makes.")
    noise: float = _noise_field(0.2, "Std of the angular jitter, in radians.")

    def scratch_bytes(self) -> float:
        return 8.0 * 12 * self.samples

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        n, k = self.samples, self.classes
        y = _balanced(rng, n, k)
        r = _uniform(rng, 0.05, 1.0, n)
        angle = TAU * (self.turns * r + y / k) + self.noise * rng.standard_normal(n)
        x = r[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        return {"x": x.astype(F32), "y": y}


class Xor(DataSource):
    """The XOR problem: noisy corners of the unit square, class = x0 XOR x1."""

    source: Literal["xor"] = source_field("xor")
    example = ({}, {"x": (60, 2), "y": (60,)})  # its test
    samples: int = samples_field()
    noise: float = _noise_field(0.1, "Std of the Gaussian noise around each corner.")

    def scratch_bytes(self) -> float:
        return 8.0 * 12 * self.samples

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        bits = rng.integers(0, 2, size=(self.samples, 2))
        x = bits + self.noise * rng.standard_normal(bits.shape)
        return {"x": x.astype(F32), "y": (bits[:, 0] ^ bits[:, 1]).astype(np.int32)}


def gaussian_mixture_centers(modes: int = 8, radius: float = 2.0) -> np.ndarray:
    """The [modes, 2] float32 centres of the ``gaussian_mixture`` source (evenly on a ring)."""
    angle = TAU * np.arange(modes) / modes
    return (radius * np.stack([np.cos(angle), np.sin(angle)], 1)).astype(F32)


class GaussianMixture(DataSource):
    """Samples of a ring of 2-D Gaussians (the classic GAN mode-coverage toy); only x."""

    source: Literal["gaussian_mixture"] = source_field("gaussian_mixture")
    example = ({}, {"x": (60, 2)})  # its test
    samples: int = samples_field()
    modes: int = Field(8, ge=1, description="Number of Gaussians, evenly spaced on the ring.")
    radius: float = Field(2.0, gt=0, description="Radius of the ring of centres.")
    std: float = Field(0.05, gt=0, description="Std of each Gaussian.")

    def scratch_bytes(self) -> float:
        return 8.0 * 12 * self.samples

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        centers = gaussian_mixture_centers(self.modes, self.radius)
        mode = rng.integers(0, self.modes, size=self.samples)
        x = centers[mode] + self.std * rng.standard_normal((self.samples, 2))
        return {"x": x.astype(F32)}


# ------------------------------------------------------------------ sequence problems

class Adding(DataSource):
    """The adding problem: values in [0,1] and a marker channel with two 1s; y = marked sum."""

    source: Literal["adding"] = source_field("adding")
    example = ({"length": 7}, {"x": (60, 7, 2), "y": (60, 1)})  # its test
    samples: int = samples_field()
    length: int = Field(10, ge=2, description="Sequence length (time steps); with "
                        "`min_length`, the longest.")
    min_length: int | None = Field(None, ge=2, description="Sequences of random lengths "
                                   "from this to `length`, zero-padded to `length`, with a "
                                   "`mask` array [N, length]: 1 for real steps, 0 for padding.")

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_length is not None and self.min_length > self.length:
            raise ValueError(f"min_length {self.min_length} is over length {self.length}")
        return self

    def scratch_bytes(self) -> float:
        return 8.0 * 7 * self.samples * self.length

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        n, length = self.samples, self.length
        values = rng.uniform(0, 1, size=(n, length))
        keys = rng.uniform(size=(n, length))
        mask = np.ones((n, length))
        if self.min_length is not None:
            real = rng.integers(self.min_length, length + 1, size=n)
            mask = (np.arange(length)[None] < real[:, None]).astype(float)
            values *= mask
            keys = np.where(mask > 0, keys, 2.0)       # never mark a padded step
        marked = np.argsort(keys, axis=1)[:, :2]        # two distinct (real) steps
        markers = np.zeros((n, length))
        np.put_along_axis(markers, marked, 1.0, axis=1)
        y = (values * markers).sum(1, keepdims=True)
        out = {"x": np.stack([values, markers], -1).astype(F32), "y": y.astype(F32)}
        return out if self.min_length is None else {**out, "mask": mask.astype(F32)}


class Parity(DataSource):
    """Random bit strings; y is 1 when the number of ones is odd."""

    source: Literal["parity"] = source_field("parity")
    example = ({"length": 5}, {"x": (60, 5, 1), "y": (60,)})  # its test
    samples: int = samples_field()
    length: int = length_field(10, "Number of bits.")

    def scratch_bytes(self) -> float:
        return 8.0 * 3 * self.samples * self.length

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        bits = rng.integers(0, 2, size=(self.samples, self.length))
        return {"x": bits[..., None].astype(F32), "y": (bits.sum(1) % 2).astype(np.int32)}


class SequenceTask(DataSource):
    """Random token sequences with a target that copies, reverses or sorts them."""

    source: Literal["sequence_task"] = source_field("sequence_task")
    example = ({"length": 6, "vocab": 5}, {"x": (60, 6), "y": (60, 6)})  # its test
    task: Literal["copy", "reverse", "sort"] = Field(
        "copy", description="What y is: x itself, x reversed, or x sorted ascending.")
    samples: int = samples_field()
    length: int = length_field(8, "Tokens per sequence.")
    vocab: int = Field(10, ge=2, description="Tokens are integers in [0, vocab).")

    def scratch_bytes(self) -> float:
        return 8.0 * 3 * self.samples * self.length

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        x = rng.integers(0, self.vocab, size=(self.samples, self.length)).astype(np.int32)
        y = {"copy": x, "reverse": x[:, ::-1], "sort": np.sort(x, axis=1)}[self.task]
        return {"x": x, "y": np.ascontiguousarray(y)}


# ------------------------------------------------------------------ images

class Images(DataSource):
    """Synthetic NCHW images in [0, 1]: per class a grating of its own angle and frequency."""

    # Each image: stripes at the class's orientation (pi * i / orients) and frequency band
    # (3 or 5.4 or 9.7 stripes per width, +-8%), random phase, in a soft disc of random place
    # and size, in random colours (lighter stripes on dark ground or darker on light), plus
    # pixel noise. Class means are flat, so nearest-mean/linear models do badly; a CNN does well.

    source: Literal["images"] = source_field("images")
    example = ({"size": 16, "channels": 3}, {"x": (60, 3, 16, 16), "y": (60,)})  # its test
    samples: int = samples_field(5000)
    classes: int = Field(10, ge=2, le=30, description="Number of classes.")
    size: int = Field(32, ge=8, description="Height and width in pixels.")
    channels: int = Field(3, ge=1, description="Colour channels (1 = grey).")
    noise: float = _noise_field(0.1, "Std of the per-pixel (uniform) noise.")

    @model_validator(mode="after")
    def _fits(self) -> Images:
        least = math.ceil(2.5 * _MAX_CYCLES * 1.8 ** (_bands(self.classes) - 1))  # > Nyquist
        if self.size < least:
            raise ValueError(f"size {self.size} is too small for {self.classes} classes; "
                             f"use size >= {least}")
        return self

    def scratch_bytes(self) -> float:  # float32 x, noise and a few [N, S, S] planes
        return 4.0 * self.samples * self.size ** 2 * (3 * self.channels + 6)

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        n, k, s, c = self.samples, self.classes, self.size, self.channels
        y = _balanced(rng, n, k)
        orients = math.ceil(k / _bands(k))
        angle = math.pi * (y % orients) / orients + _uniform(rng, -0.05, 0.05, n)
        cycles = 1.8 ** (y // orients) * _uniform(rng, 3 / 1.08, _MAX_CYCLES, n)  # per width
        phase, cx, cy = _uniform(rng, 0, TAU, n), *_uniform(rng, 0.3, 0.7, 2, n)
        radius = _uniform(rng, 0.3, 0.5, n)
        col = lambda v: v.astype(F32)[:, None, None]  # per-sample scalars -> [N, 1, 1]
        grid = (np.arange(s, dtype=F32) + 0.5) / s
        yy, xx = grid[:, None], grid[None, :]
        u = xx * col(np.cos(angle)) + yy * col(np.sin(angle))
        stripes = 0.5 + 0.5 * np.sin(col(TAU * cycles) * u + col(phase))
        dist = np.sqrt((xx - col(cx)) ** 2 + (yy - col(cy)) ** 2)
        pattern = stripes / (1 + np.exp((dist - col(radius)) / F32(0.03)))  # [N, S, S]
        bg = _uniform(rng, 0.1, 0.9, n, c)  # stripes lighter on dark ground, darker on light
        fg = np.clip(bg + np.where(bg.mean(1, keepdims=True) < 0.5, 1, -1)
                     * _uniform(rng, 0.3, 0.6, n, c), 0, 1)
        fg, bg = (v.astype(F32)[:, :, None, None] for v in (fg, bg))  # [N, C, 1, 1]
        x = bg + (fg - bg) * pattern[:, None]
        noise = rng.random(x.shape, dtype=F32)  # uniform: 3x faster than normal, same std
        x += (noise - F32(0.5)) * F32(self.noise * math.sqrt(12))
        return {"x": np.clip(x, 0, 1, out=x), "y": y}


_MAX_CYCLES = 3.0 * 1.08  # stripes per image width of the coarsest band (with jitter)


def _bands(classes: int) -> int:
    """How many grating frequencies the classes of ``images`` use."""
    return 1 if classes <= 4 else 2 if classes <= 12 else 3
