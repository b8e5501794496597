"""Splitting named arrays into train/validation sets and iterating over them in batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dlgraph.engine.errors import DataError
from dlgraph.engine.io.data.base import Arrays, check_lengths

# Streams of randomness are told apart by a tag, so that the same seed gives unrelated draws
# for generating data, splitting it, and shuffling each epoch.
DATA, SPLIT, SHUFFLE = 1, 2, 3


def rng_for(seed: int, *tags: int) -> np.random.Generator:
    """A generator for ``seed`` and ``tags``; any integer seed works (negative too)."""
    return np.random.default_rng([int(s) & (2**64 - 1) for s in (seed, *tags)])


def split(arrays: Arrays, val_fraction: float, seed: int,
          stratify: np.ndarray | None = None) -> tuple[Arrays, Arrays]:
    """Shuffle under ``seed`` and cut off ``val_fraction`` of the samples (at least one when
    the fraction is above 0) as the validation set; returns ``(train, val)``.

    With ``stratify`` (one integer class label per sample) each class keeps its share in
    both sets: its validation count is its share of the validation size, rounded so that
    the counts add up (largest remainders first, ties to the lower label)."""
    n = check_lengths(arrays)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}",
                        help="e.g. 0.1 keeps a tenth of the samples for validation")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n_val >= n:
        raise DataError(f"cannot keep {n_val} of {n} samples for validation and still train",
                        help="use more samples or a smaller val_fraction")
    order = rng_for(seed, SPLIT).permutation(n)
    if stratify is not None:
        order = _stratified(order, np.asarray(stratify).reshape(n), n_val)
    train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    return {k: v[train] for k, v in arrays.items()}, {k: v[val] for k, v in arrays.items()}


def _stratified(order: np.ndarray, labels: np.ndarray, n_val: int) -> np.ndarray:
    """``order`` rearranged so that its first ``n_val`` samples hold each class's share: the
    first samples of each class in the shuffled order go to validation."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = n_val * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[:n_val - take.sum()]
    take[extra] += 1
    rank = np.empty(len(order), np.int64)       # a sample's place among its class, in order
    shuffled = labels[order]
    for c in classes:
        rank[np.flatnonzero(shuffled == c)] = np.arange(int((shuffled == c).sum()))
    limit = take[np.searchsorted(classes, shuffled)]
    val = rank < limit
    return np.concatenate([order[val], order[~val]])


def num_batches(arrays: Arrays, batch_size: int, drop_last: bool = True) -> int:
    """How many batches :func:`batches` yields per epoch."""
    n = check_lengths(arrays)
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(arrays: Arrays, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
            drop_last: bool = True) -> Iterator[Arrays]:
    """Batches (dicts with the same keys) of one epoch, in an order fixed by (seed, epoch).

    Checks happen at the call, not at the first ``next``: DataError when there are fewer
    samples than one batch (with ``drop_last``; without it the one short batch comes out).
    """
    n = check_lengths(arrays)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if n < batch_size and (drop_last or n == 0):
        raise DataError(f"there are only {n} samples, fewer than one batch of {batch_size}",
                        help=f"use a batch size of at most {n}, or more samples")
    order = rng_for(seed, SHUFFLE, epoch).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n

    def generate() -> Iterator[Arrays]:
        for i in range(0, stop, batch_size):
            pick = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            yield {k: v[pick] for k, v in arrays.items()}

    return generate()
