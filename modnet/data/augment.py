"""Training augmentation: torchvision.transforms.v2, chosen per dataset, seeded per sample.

Two policies, the standard ones for small images:

- ``crop_flip``: pad by ``img_size // 8`` pixels (zeros) and crop back at a
  random offset (``v2.RandomCrop(size, padding)``), then flip horizontally
  with probability 1/2 (``v2.RandomHorizontalFlip``): natural images (CIFAR-10,
  CIFAR-100, Fashion-MNIST, photo folders) and the synthetic shapes.
- ``crop``: the pad-and-crop alone, for data a mirror image would mislabel:
  digits and characters (MNIST, USPS, KMNIST, SVHN, MNIST-M), npz archives and
  datasets registered without a policy (their content is unknown).
- ``none``: ``synth_position``, whose label is where the shape is.

``load_task(..., augment=True)`` writes the policy into the task's transform
record (``record["augment"]``), so a run's manifest says how its training
images were augmented. Evaluation and ``apply_transform`` never augment.

Measured effect on the CIFAR-10 subset with ``modnet_conv_tiny`` (one thread,
batch 64, default options): short runs are capacity-bound and augmentation
costs accuracy there: 1000 training images, 5 epochs, seeds 0/1/2: 31.6/27.6/
30.6 % without, 28.0/26.6/27.8 % with; 500 images, 15 epochs, seed 0: 36.8 %
without, 33.2 % with. Its cost in time is negligible (about 40 ms per batch
of 64 on one loaded core, against seconds per training step).

Every sample's random draw is seeded by (run seed, step, share of the step,
position in it): a resumed run sees exactly the augmented images it would have seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from .errors import DataError
from .subset import derive_seed

POLICIES = ("crop_flip", "crop", "none")
DATASET_POLICIES = {
    "cifar10": "crop_flip",
    "cifar100": "crop_flip",
    "fashion_mnist": "crop_flip",
    "folder": "crop_flip",
    "shards": "crop_flip",
    "mnist": "crop",
    "kmnist": "crop",
    "usps": "crop",
    "svhn": "crop",
    "mnist_m": "crop",
}
DEFAULT_POLICY = "crop"


def policy_for(source: Mapping[str, Any]) -> str:
    """The augmentation policy of a dataset, from its record's ``source``."""
    if "base" in source:  # a corrupted dataset: its base decides
        return policy_for(source["base"])
    dataset = source.get("dataset")
    if dataset == "synthetic":
        return "none" if source.get("attribute") == "position" else "crop_flip"
    return DATASET_POLICIES.get(str(dataset), DEFAULT_POLICY)


def set_policy(dataset: str, policy: str) -> None:
    """Sets the policy of a dataset (``register_dataset(..., augment=policy)`` calls this)."""
    if policy not in POLICIES:
        raise DataError(f"unknown augmentation policy {policy!r}: choose one of {POLICIES}")
    DATASET_POLICIES[dataset] = policy


def augment_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``augment`` entry of a transform record: policy and parameters."""
    policy = policy_for(record.get("source", {}))
    return {"policy": policy, "padding": max(1, int(record["img_size"]) // 8)}


def build_augmentation(record: Mapping[str, Any]) -> v2.Compose | None:
    """The transform of a task's record (uint8 [C, H, W] to the same), or None.

    None when the record asks for no augmentation (no ``augment`` entry, or
    the ``none`` policy).
    """
    spec = record.get("augment")
    if not spec or spec["policy"] == "none":
        return None
    if spec["policy"] not in POLICIES:
        raise DataError(f"unknown augmentation policy {spec['policy']!r}: choose one of {POLICIES}")
    steps: list[Any] = [v2.RandomCrop(int(record["img_size"]), padding=int(spec["padding"]))]
    if spec["policy"] == "crop_flip":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def sample_seed(seed: int, step: int, shard: int, position: int) -> int:
    """The seed of one sample's augmentation: a pure function of where it is used.

    ``shard`` is the share of the step (the rank, or a micro-batch of a rank)
    and ``position`` the sample's place in that share.
    """
    return derive_seed(seed, "augment", str(step), str(shard), str(position))


def augment_images(
    images: torch.Tensor, transform: v2.Compose, seeds: Sequence[int]
) -> torch.Tensor:
    """Each image of a uint8 [B, C, H, W] batch augmented with its own seed.

    The global RNG is forked, so the caller's random state is untouched.
    """
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        for row, seed in enumerate(seeds):
            torch.manual_seed(seed)
            out[row] = transform(images[row])
    return out
