"""The built-in synthetic suite: one shape per image, a task per attribute.

Images are drawn procedurally at the model's size (RGB, 32x32 by default),
vectorised over the batch, deterministically from a seed. Each image shows one
anti-aliased shape of some colour, size and position, rotated by up to 12
degrees, on a plain grey background of random level. Every task labels the
*same* images by a different attribute, so tasks share low-level features but
need different high-level ones.

Spec syntax: ``synth_<attribute>[-<modifier>...]`` (also the task name).

Attributes (the label):

- ``shape``: 4 classes: circle, square, triangle, cross.
- ``color``: 6 classes: red, yellow, green, cyan, blue, magenta (hue jittered by
  up to 12 degrees, random saturation and brightness).
- ``size``: 3 classes: small, medium, large (radius bands with a gap between them).
- ``position``: 4 classes: the quadrant of the shape's centre (top_left,
  top_right, bottom_left, bottom_right). Not in ``SYNTHETIC_DEFAULT_TASKS``: a
  globally pooled convnet must learn to read position from its padding, which
  takes far longer than the other tasks (a ViT has position embeddings).

``SYNTHETIC_DEFAULT_TASKS`` (shape, color, size) is what ``modnet train`` runs
without arguments: each defaults to 2400 training and 1000 test images (set
with ``train_limit``/``test_limit``), sized so that the default two epochs of
``modnet_conv_tiny`` finish in about four minutes on 2 CPU cores: colour is then
solved, size well above chance, and shape clearly above chance but not solved
(4000 images per task solve all three in about six minutes).

Domain modifiers shift the image distribution, never the labels; they combine
freely and apply in the order bg, color, noise:

- ``bg``: a textured, coloured background (a smooth random colour field times
  random stripes) instead of a plain grey one.
- ``color``: a global colour cast: hues rotated by 40 degrees, saturation cut by
  a third, then a warm tint (red up 15%, blue down 20%), as under other light.
- ``noise``: additive Gaussian pixel noise, sigma 0.05-0.15 (of the 0-1 range) per image.

Held-out combinations, for compositional generalisation:

- ``holdout``: the (shape, colour) pairs circle-red, square-yellow,
  triangle-green and cross-cyan (``HELD_OUT_PAIRS``) never appear in the
  training split, and the test split holds only them. Training images that
  would show a held-out pair get another colour; every shape and every colour
  still appears in training.

Examples: ``synth_shape``, ``synth_color-bg``, ``synth_size-noise``,
``synth_shape-bg-noise``, ``synth_shape-holdout``.

One seed gives the same scenes (shapes, colours, sizes, positions, angles) to
every attribute and domain: ``synth_shape`` and ``synth_color`` label the same
images, and ``synth_shape-noise`` is ``synth_shape`` plus noise. The train and
test splits are separate random streams, so the test set does not depend on
the number of training images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .build import build_task
from .errors import DataError
from .options import LoadOptions
from .subset import derive_seed
from .task_data import TaskData

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "color": ("red", "yellow", "green", "cyan", "blue", "magenta"),
    "size": ("small", "medium", "large"),
    "position": ("top_left", "top_right", "bottom_left", "bottom_right"),
}
DOMAINS = ("bg", "color", "noise")  # in the order they apply
HOLDOUT = "holdout"
HELD_OUT_PAIRS = (("circle", "red"), ("square", "yellow"), ("triangle", "green"), ("cross", "cyan"))
SYNTHETIC_DEFAULT_TASKS = ["synth_shape", "synth_color", "synth_size"]
DEFAULT_TRAIN = 2400
DEFAULT_TEST = 1000
STATS_IMAGES = 500  # normalisation statistics: a fixed sample, independent of limits and seed
GENERATOR_VERSION = 2  # bump when the images a seed gives change

# Geometry, as fractions of the image side.
_SIZE_BANDS = ((0.13, 0.17), (0.195, 0.235), (0.26, 0.30))  # radius per size class
_EXTENT = 1.2  # bounding radius / radius, for any shape at any angle
_MID_GAP = 0.04  # centres keep this far from the image's middle lines
_MAX_ANGLE = math.radians(12)
_HUE_JITTER = 12.0  # degrees
_CAST_HUE, _CAST_SATURATION, _CAST_TINT = math.radians(40), 2 / 3, (1.15, 1.0, 0.8)
_NOISE_SIGMA = (0.05, 0.15)
_PIXELS_PER_CHUNK = 1 << 22  # images rendered at a time: bounds the float working memory


@dataclass(frozen=True)
class SynthSpec:
    """A parsed synthetic spec."""

    attribute: str
    domains: tuple[str, ...] = ()  # in DOMAINS order
    holdout: bool = False

    @property
    def classes(self) -> tuple[str, ...]:
        return ATTRIBUTES[self.attribute]


def is_synthetic(spec: str) -> bool:
    return spec.startswith("synth")


def parse_synthetic_spec(spec: str) -> SynthSpec:
    """Parses ``synth_<attribute>[-<modifier>...]`` (see the module docstring)."""
    syntax = (
        f"synthetic specs are synth_<attribute>[-<modifier>...] with attribute one of "
        f"{list(ATTRIBUTES)} and modifiers from {[*DOMAINS, HOLDOUT]}, e.g. synth_shape-bg-noise"
    )
    if not spec.startswith("synth_"):
        raise DataError(f"unknown synthetic dataset {spec!r}: {syntax}")
    attribute, *modifiers = spec[len("synth_") :].split("-")
    if attribute not in ATTRIBUTES:
        raise DataError(f"unknown synthetic attribute {attribute!r} in {spec!r}: {syntax}")
    unknown = [m for m in modifiers if m not in (*DOMAINS, HOLDOUT)]
    if unknown:
        raise DataError(f"unknown modifier(s) {unknown} in {spec!r}: {syntax}")
    if len(set(modifiers)) != len(modifiers):
        raise DataError(f"{spec!r} repeats a modifier: give each modifier once")
    domains = tuple(d for d in DOMAINS if d in modifiers)
    return SynthSpec(attribute, domains, HOLDOUT in modifiers)


def _balanced(count: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    """Labels with every class equally often (up to one), in random order."""
    return (torch.arange(count) % classes)[torch.randperm(count, generator=generator)]


def synthetic_scenes(
    count: int, *, img_size: int = 32, seed: int = 0, split: str = "train", holdout: bool = False
) -> dict[str, torch.Tensor]:
    """Samples the scenes (labels and nuisance parameters) of ``count`` images.

    Returns:
        The four attribute labels (int64 [count], balanced unless ``holdout``
        recolours some) and the drawing parameters in pixels: ``cx``, ``cy``,
        ``radius``, ``angle`` (radians), ``hue`` (degrees), ``saturation``,
        ``value``, ``background`` (grey level in [0, 1]).
    """
    if count < 1:
        raise DataError(f"the synthetic suite needs at least one image per split, got {count}")
    g = torch.Generator().manual_seed(derive_seed(seed, "synthetic", split))
    labels = {name: _balanced(count, len(values), g) for name, values in ATTRIBUTES.items()}
    u = torch.rand(count, 9, generator=g, dtype=torch.float64)
    if holdout:
        held = torch.full((len(ATTRIBUTES["shape"]),), -1)
        for shape, color in HELD_OUT_PAIRS:
            held[ATTRIBUTES["shape"].index(shape)] = ATTRIBUTES["color"].index(color)
        forbidden = held[labels["shape"]]
        if split == "test":
            labels["color"] = torch.where(forbidden >= 0, forbidden, labels["color"])
        else:  # another colour, uniformly among the allowed ones
            clash = labels["color"] == forbidden
            other = (u[:, 8] * (len(ATTRIBUTES["color"]) - 1)).long()
            other = other + (other >= forbidden).long()
            labels["color"] = torch.where(clash, other, labels["color"])
    size = float(img_size)
    bands = torch.tensor(_SIZE_BANDS, dtype=torch.float64)[labels["size"]]
    radius = size * (bands[:, 0] + (bands[:, 1] - bands[:, 0]) * u[:, 0])
    # centres keep the whole shape inside the image and _MID_GAP away from the middle
    inner = _EXTENT * radius + 0.5
    near = torch.full_like(radius, size * (0.5 - _MID_GAP))
    far = torch.full_like(radius, size * (0.5 + _MID_GAP))
    centre = []
    for axis, side in ((0, labels["position"] % 2), (1, labels["position"] // 2)):
        low = torch.where(side == 0, inner, far)
        high = torch.maximum(torch.where(side == 0, near, size - inner), low)
        centre.append(low + (high - low) * u[:, 1 + axis])
    hue = labels["color"] * 60.0 + (u[:, 4] * 2 - 1) * _HUE_JITTER
    return dict(
        labels,
        cx=centre[0].float(),
        cy=centre[1].float(),
        radius=radius.float(),
        angle=((u[:, 3] * 2 - 1) * _MAX_ANGLE).float(),
        hue=hue.float(),
        saturation=(0.6 + 0.4 * u[:, 5]).float(),
        value=(0.7 + 0.3 * u[:, 6]).float(),
        background=(0.05 + 0.3 * u[:, 7]).float(),
    )


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[N] HSV (hue in degrees) to [N, 3] RGB in [0, 1]."""
    h = (hue % 360.0) / 60.0
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h) % 6.0
        out.append(value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def _signed_distance(shape: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) to one shape class of radius ``r``."""
    if shape == 0:  # circle
        return torch.sqrt(u * u + v * v) - r
    if shape == 1:  # square, half side 0.85 r
        return torch.maximum(u.abs(), v.abs()) - 0.85 * r
    if shape == 2:  # triangle pointing up, circumradius 1.2 r, centred on its centroid
        inradius = 0.6 * r
        s = math.sqrt(3) / 2
        return torch.maximum(torch.maximum(v, -s * u - 0.5 * v), s * u - 0.5 * v) - inradius
    # cross: two bars, half length r, half width 0.3 r
    a, b = r, 0.3 * r
    return torch.minimum(
        torch.maximum(u.abs() - a, v.abs() - b), torch.maximum(u.abs() - b, v.abs() - a)
    )


def _colour_cast() -> torch.Tensor:
    """3x3 matrix: hue rotation about the grey axis, desaturation, then a tint."""
    k = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor(
        [[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64
    )
    c, s = math.cos(_CAST_HUE), math.sin(_CAST_HUE)
    rotation = c * torch.eye(3, dtype=torch.float64) + (1 - c) * torch.outer(k, k) + s * cross
    grey = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    desaturate = _CAST_SATURATION * torch.eye(3, dtype=torch.float64)
    desaturate = desaturate + (1 - _CAST_SATURATION) * grey
    return (
        torch.diag(torch.tensor(_CAST_TINT, dtype=torch.float64)) @ desaturate @ rotation
    ).float()


def _textured_backgrounds(count: int, img_size: int, g: torch.Generator) -> torch.Tensor:
    """[count, 3, S, S] smooth random colour fields modulated by random stripes."""
    field = torch.rand(count, 3, 4, 4, generator=g)
    field = F.interpolate(field, size=(img_size, img_size), mode="bicubic", align_corners=False)
    p = torch.rand(count, 3, generator=g)
    freq = (1.5 + 2.5 * p[:, 0]).view(-1, 1, 1) * 2 * math.pi / img_size
    angle = (p[:, 1] * math.pi).view(-1, 1, 1)
    phase = (p[:, 2] * 2 * math.pi).view(-1, 1, 1)
    grid = torch.arange(img_size, dtype=torch.float32) + 0.5
    y, x = grid.view(1, -1, 1), grid.view(1, 1, -1)
    stripes = 0.5 + 0.5 * torch.sin(freq * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
    return field.clamp(0, 1) * (0.55 + 0.45 * stripes.unsqueeze(1))


def render_synthetic(
    scenes: dict[str, torch.Tensor],
    *,
    img_size: int = 32,
    domains: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    split: str = "train",
) -> torch.Tensor:
    """Draws scenes from ``synthetic_scenes`` as uint8 [N, 3, S, S] RGB images.

    Domain randomness (textures, noise) comes from its own seeded stream, so a
    domain changes pixels but never the scenes.
    """
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise DataError(f"unknown synthetic domain(s) {unknown}: choose from {list(DOMAINS)}")
    count, size = len(scenes["shape"]), img_size
    out = torch.empty(count, 3, size, size, dtype=torch.uint8)
    colours = _hsv_to_rgb(scenes["hue"], scenes["saturation"], scenes["value"])
    streams = {
        d: torch.Generator().manual_seed(derive_seed(seed, "synthetic", split, d)) for d in domains
    }
    sigma = None
    if "noise" in domains:
        low, high = _NOISE_SIGMA
        sigma = low + (high - low) * torch.rand(count, generator=streams["noise"])
    cast = _colour_cast() if "color" in domains else None
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for start in range(0, count, chunk):
        rows = slice(start, min(start + chunk, count))
        n = rows.stop - rows.start
        dx = grid.view(1, 1, -1) - scenes["cx"][rows].view(-1, 1, 1)
        dy = grid.view(1, -1, 1) - scenes["cy"][rows].view(-1, 1, 1)
        cos = torch.cos(scenes["angle"][rows]).view(-1, 1, 1)
        sin = torch.sin(scenes["angle"][rows]).view(-1, 1, 1)
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        radius = scenes["radius"][rows].view(-1, 1, 1).expand(-1, size, size)
        distance = torch.empty(n, size, size)
        shapes = scenes["shape"][rows]
        for shape in range(len(ATTRIBUTES["shape"])):
            mask = shapes == shape
            if mask.any():
                distance[mask] = _signed_distance(shape, u[mask], v[mask], radius[mask])
        alpha = (0.5 - distance).clamp_(0, 1).unsqueeze(1)
        if "bg" in domains:
            background = _textured_backgrounds(n, size, streams["bg"])
        else:
            background = scenes["background"][rows].view(-1, 1, 1, 1).expand(-1, 3, size, size)
        image = torch.lerp(background, colours[rows].view(-1, 3, 1, 1), alpha)
        if cast is not None:
            image = torch.einsum("ij,njhw->nihw", cast, image)
        if sigma is not None:
            noise = torch.randn(n, 3, size, size, generator=streams["noise"])
            image = image + sigma[rows].view(-1, 1, 1, 1) * noise
        out[rows] = (image * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def make_synthetic(
    count: int,
    *,
    img_size: int = 32,
    seed: int = 0,
    split: str = "train",
    domains: tuple[str, ...] | list[str] = (),
    holdout: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` images (uint8 [N, 3, S, S]) and every attribute's labels (int64 [N])."""
    scenes = synthetic_scenes(count, img_size=img_size, seed=seed, split=split, holdout=holdout)
    images = render_synthetic(scenes, img_size=img_size, domains=domains, seed=seed, split=split)
    return images, {name: scenes[name] for name in ATTRIBUTES}


def load_synthetic(spec: str, options: LoadOptions) -> TaskData:
    """Loads one task of the synthetic suite; ``train_limit``/``test_limit`` set the sizes."""
    parsed = parse_synthetic_spec(spec)
    counts = {
        "train": options.train_limit or DEFAULT_TRAIN,
        "test": options.test_limit or DEFAULT_TEST,
    }
    made = {
        split: make_synthetic(
            counts[split],
            img_size=options.img_size,
            seed=options.seed,
            split=split,
            domains=parsed.domains,
            holdout=parsed.holdout,
        )
        for split in ("train", "test")
    }
    stats_x, _ = make_synthetic(
        STATS_IMAGES,
        img_size=options.img_size,
        split="stats",
        domains=parsed.domains,
        holdout=parsed.holdout,
    )
    source = {
        "dataset": "synthetic",
        "spec": spec,
        "generator_version": GENERATOR_VERSION,
        "attribute": parsed.attribute,
        "domains": list(parsed.domains),
        "holdout": parsed.holdout,
    }
    if parsed.holdout:
        source["held_out_pairs"] = [list(pair) for pair in HELD_OUT_PAIRS]
    return build_task(
        spec,
        made["train"][0],
        made["train"][1][parsed.attribute],
        made["test"][0],
        made["test"][1][parsed.attribute],
        options,
        source=source,
        source_size=[options.img_size, options.img_size],
        source_chans=3,
        num_classes=len(parsed.classes),
        classes=parsed.classes,
        stats_x=stats_x,
    )
