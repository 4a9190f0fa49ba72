"""modnet: modular networks from a shared pool of interchangeable blocks.

Importing modnet registers its models with timm (``timm.create_model("modnet_conv_tiny")``),
and on Linux with glibc sets malloc's thresholds so that CPU training and
evaluation reuse mapped memory instead of faulting it in every step
(``modnet.malloc``; ``MODNET_TUNE_MALLOC=0`` keeps glibc's own).
"""

from . import factory as _factory  # noqa: F401  (registers the timm entrypoints)
from .export import ExportedNet
from .factory import from_timm
from .families import Family, conv_family, timm_family, vit_family
from .malloc import tune_malloc
from .model import ModularNet
from .norm_stats import TaskNormStats
from .pool import TemplatePool
from .routing import HardRoute, HyperNetwork, HyperRoute, Route, RoutePlan, SoftRoute

tune_malloc()  # at import: before the caller's models and data fill the heap

__version__ = "0.1.0"

__all__ = [
    "ExportedNet",
    "Family",
    "HardRoute",
    "HyperNetwork",
    "HyperRoute",
    "ModularNet",
    "Route",
    "RoutePlan",
    "SoftRoute",
    "TaskNormStats",
    "TemplatePool",
    "conv_family",
    "from_timm",
    "timm_family",
    "tune_malloc",
    "vit_family",
]
