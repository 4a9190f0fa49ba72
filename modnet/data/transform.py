"""Bringing raw images to the model's size and channels, once, as uint8 tensors.

Every dataset goes through ``convert_images``: channel conversion (grayscale to
RGB by repeating, RGB to grayscale by luminance, RGBA by dropping alpha) and a
resize with ``torch.nn.functional.interpolate``, in float, rounded once back to
uint8. Converting once and normalising per batch keeps training on a small CPU
fast: the training loop only indexes a tensor.

A task's ``transform`` record (``make_record``) says what was done, and
``apply_transform`` repeats it on new raw images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .options import CHANNELS, RESIZE_MODES

RECORD_VERSION = 1
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses
_CHUNK = 2048  # images converted at a time: bounds the float32 working memory

ImageBatch = torch.Tensor | np.ndarray | Sequence[Any]


def channel_conversion(source_chans: int, in_chans: int) -> str:
    """Names the conversion from ``source_chans`` to ``in_chans`` channels."""
    if source_chans == in_chans:
        return "none"
    if source_chans == 1:
        return "repeat"
    if source_chans in (3, 4) and in_chans == 1:
        return "luminance"
    if source_chans == 4 and in_chans == 3:
        return "drop_alpha"
    raise DataError(
        f"cannot convert {source_chans}-channel images to {in_chans} channels: "
        "give grayscale (1), RGB (3) or RGBA (4) images"
    )


def as_nchw(images: torch.Tensor | np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """A uint8 [N, C, H, W] view of [N, H, W], [N, C, H, W] or (channels_last) [N, H, W, C]."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not torch.is_tensor(x):
        raise DataError(f"expected a tensor or numpy array of images, got {type(images).__name__}")
    if x.dtype != torch.uint8:
        given = images.dtype if isinstance(images, np.ndarray) else x.dtype
        raise DataError(
            f"images must be uint8 (0..255), got {given}: convert them first "
            "(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    if x.ndim == 3:
        if channels_last and x.shape[-1] in (1, 3, 4):
            raise DataError(
                f"images have shape {tuple(x.shape)} with channels_last: one [H, W, C] image "
                "or [N, H, W] grayscale images? Give one image a batch axis (images[None])"
            )
        return x.unsqueeze(1)
    if x.ndim != 4:
        raise DataError(
            f"images have shape {tuple(x.shape)}: expected [N, H, W] (grayscale) or "
            f"{'[N, H, W, C]' if channels_last else '[N, C, H, W]'}"
        )
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3, 4):
        layout = "[N, H, W, C]" if channels_last else "[N, C, H, W]"
        raise DataError(
            f"images have shape {tuple(images.shape)} with {x.shape[1]} channels: expected "
            f"{layout} with 1, 3 or 4 channels"
        )
    return x


def _convert_tensor(
    x: torch.Tensor, img_size: int, in_chans: int, resize: str, antialias: bool
) -> torch.Tensor:
    """Converts a uint8 [N, C, H, W] tensor; the work happens in chunks of ``_CHUNK`` images."""
    conversion = channel_conversion(x.shape[1], in_chans)
    if conversion == "drop_alpha" or (conversion == "luminance" and x.shape[1] == 4):
        x = x[:, :3]
    same_size = tuple(x.shape[-2:]) == (img_size, img_size)
    if same_size and conversion in ("none", "repeat", "drop_alpha"):
        out = x.contiguous()
    else:
        out = torch.empty(
            len(x), 1 if conversion == "repeat" else in_chans, img_size, img_size, dtype=torch.uint8
        )
        for start in range(0, len(x), _CHUNK):
            chunk = x[start : start + _CHUNK].float()
            if conversion == "luminance":
                weights = torch.tensor(LUMA).view(1, 3, 1, 1)
                chunk = (chunk * weights).sum(1, keepdim=True)
            if not same_size:
                chunk = _resize(chunk, img_size, resize, antialias)
            out[start : start + len(chunk)] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    if conversion == "repeat":
        out = out.expand(-1, in_chans, -1, -1).contiguous()
    return out


def _resize(x: torch.Tensor, img_size: int, mode: str, antialias: bool) -> torch.Tensor:
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(
            x, size=(img_size, img_size), mode=mode, align_corners=False, antialias=antialias
        )
    if mode == "nearest":
        return F.interpolate(x, size=(img_size, img_size), mode="nearest-exact")
    return F.interpolate(x, size=(img_size, img_size), mode=mode)


def image_to_tensor(image: Any, channels_last: bool = False) -> torch.Tensor:
    """One PIL image or [C, H, W] / [H, W] uint8 tensor/array as a uint8 [C, H, W] tensor.

    With ``channels_last`` a 3-D array or tensor is read as [H, W, C].
    """
    if hasattr(image, "getbands"):  # a PIL image
        if image.mode in ("1", "I", "I;16", "F"):
            image = image.convert("L")
        elif image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy())
        return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    ndim = getattr(image, "ndim", 0)
    if ndim == 2:
        return as_nchw(image[None])[0]
    if ndim == 3:
        return as_nchw(image[None], channels_last)[0]
    raise DataError(
        f"an image must be a PIL image or a [C, H, W] / [H, W] uint8 array, got "
        f"{type(image).__name__} with {ndim} dimensions"
    )


def convert_images(
    images: ImageBatch,
    img_size: int,
    in_chans: int,
    resize: str = "bilinear",
    antialias: bool = True,
    channels_last: bool = False,
) -> torch.Tensor:
    """Raw images to a uint8 [N, in_chans, img_size, img_size] tensor.

    Args:
        images: A uint8 tensor or array ([N, H, W], [N, C, H, W], or [N, H, W, C]
            with ``channels_last``), or a sequence of PIL images / [C, H, W]
            tensors ([H, W, C] with ``channels_last``), which may differ in size
            (each size group is resized in batches).
        img_size: Output side.
        in_chans: Output channels (1 or 3).
        resize: Interpolation mode used when the size differs.
        antialias: Low-pass filter when shrinking (bilinear and bicubic), so that
            shrinking large images does not alias.
        channels_last: The array is [N, H, W, C] (each image of a sequence [H, W, C]).

    Raises:
        DataError: Images that are not uint8, of a shape none of the above, or a
            3-D array with ``channels_last`` whose last axis could be channels
            (one [H, W, C] image or [N, H, W] grayscale images: give one image a
            batch axis).
    """
    if in_chans not in CHANNELS:
        raise DataError(f"in_chans must be 1 or 3, got {in_chans}")
    if resize not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {resize!r}: choose one of {RESIZE_MODES}")
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        return _convert_tensor(
            as_nchw(images, channels_last), img_size, in_chans, resize, antialias
        )
    tensors = [image_to_tensor(image, channels_last) for image in images]
    out = torch.empty(len(tensors), in_chans, img_size, img_size, dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(index)
    for indices in groups.values():
        batch = torch.stack([tensors[i] for i in indices])
        out[indices] = _convert_tensor(batch, img_size, in_chans, resize, antialias)
    return out


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std (in [0, 1] units) of a uint8 [N, C, H, W] tensor.

    Histograms keep this exact and cheap whatever the size: no float copy of the data.
    """
    if images.numel() == 0:
        raise DataError("cannot compute normalisation statistics of an empty image set")
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        var = float((counts * (levels - mean) ** 2).sum() / total)
        means.append(round(mean, 6))
        stds.append(round(max(math.sqrt(var), 1e-3), 6))
    return means, stds


def make_record(
    *,
    source: dict[str, Any],
    source_size: Sequence[int] | None,
    source_chans: int,
    img_size: int,
    in_chans: int,
    resize: str,
    mean: Sequence[float],
    std: Sequence[float],
    classes: Sequence[str] | None = None,
    antialias: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-serialisable record of how a task's raw images were brought to the model."""
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "source": dict(source),
        "source_size": list(source_size) if source_size is not None else None,
        "source_chans": int(source_chans),
        "img_size": int(img_size),
        "in_chans": int(in_chans),
        "resize": resize,
        "antialias": bool(antialias),
        "channel_conversion": channel_conversion(source_chans, in_chans),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
    if classes is not None:
        record["classes"] = [str(c) for c in classes]
    record.update(extra)
    return record


def apply_transform(
    record: dict[str, Any], images: ImageBatch, *, channels_last: bool = False
) -> torch.Tensor:
    """Preprocesses new raw images exactly as a task's images were.

    Args:
        record: A task's ``transform`` record (``TaskData.transform``, or as saved
            with a checkpoint).
        images: Raw uint8 images, in any form ``convert_images`` takes.
        channels_last: The array is [N, H, W, C] (numpy's usual layout); each
            image of a sequence is [H, W, C].

    Returns:
        A uint8 [N, in_chans, img_size, img_size] tensor; ``TaskData.normalize``
        (or the record's mean and std) makes it model input.
    """
    missing = [k for k in ("img_size", "in_chans", "resize") if k not in record]
    if missing:
        raise DataError(
            f"transform record lacks {missing}: pass a task's `transform` (TaskData.transform)"
        )
    return convert_images(
        images,
        int(record["img_size"]),
        int(record["in_chans"]),
        record["resize"],
        bool(record.get("antialias", True)),
        channels_last=channels_last,
    )
