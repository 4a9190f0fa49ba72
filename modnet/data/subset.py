"""Deterministic, class-balanced subsets for quick runs, and seeds derived by name."""

from __future__ import annotations

import warnings
import zlib

import torch


def derive_seed(seed: int, *labels: str) -> int:
    """A seed for one named random stream (e.g. the test split) of a run seeded with ``seed``.

    Separate streams keep, for example, the test set independent of ``train_limit``.
    CRC32 rather than ``hash()``, which Python salts per process.
    """
    text = "/".join([str(int(seed)), *labels])
    return zlib.crc32(text.encode())


def balanced_indices(labels: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor | None:
    """Indices of at most ``limit`` samples, as balanced over classes as the data allows.

    Classes take turns in a seeded random order: every class gets
    ``limit // num_classes`` samples, or all it has if fewer, and the rest goes to
    the larger classes. Returns None when every sample is kept (no copy needed);
    otherwise sorted indices, so the subset keeps the dataset's order.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return None
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    shuffled = labels[perm]
    # rank of each sample within its class, in the shuffled order
    order = torch.argsort(shuffled, stable=True)
    sorted_labels = shuffled[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(n), 0), 0).values
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - first
    # round-robin over classes: all rank-0 samples first, then rank 1, ...
    chosen = torch.argsort(rank * n + torch.arange(n))[:limit]
    return torch.sort(perm[chosen]).values


def warn_missing_classes(name: str, labels: torch.Tensor, limit: int | None) -> None:
    """Warns when ``limit`` training samples cannot hold every class of the split.

    A balanced subset of at least as many samples as classes holds them all; a
    smaller one trains a head whose missing classes the test split still scores.
    """
    held = int(torch.unique(labels).numel())
    if limit is not None and limit < held:
        warnings.warn(
            f"{name}: train_limit={limit} keeps {limit} of the {held} classes of the "
            f"training split, so the model never sees the others: raise it to at least {held}",
            stacklevel=3,
        )
