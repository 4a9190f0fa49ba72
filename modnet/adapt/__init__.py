"""Unsupervised multi-source domain adaptation by re-routing a trained pool of modules.

``adapt(run_dir, target, sources, objective=...)`` adds the unlabelled target
domain as one more task whose route (and, if asked, head, statistics or stem)
learns to minimise an objective between target and source features. See
``modnet.adapt.api`` for the flow and ``modnet.adapt.objectives`` for the
objectives.
"""

from .api import AdaptResult, adapt
from .diagnose import diagnose_objectives
from .errors import AdaptationError
from .norm import reestimate_norm_stats
from .objectives import (
    OBJECTIVES,
    AdaptationObjective,
    OptionRange,
    check_objective_options,
    make_objective,
    objective_class,
    objective_names,
    objective_summary,
    register_objective,
)
from .relation import route_relation, save_relation_heatmap
from .report import summary_lines
from .selection import source_distances
from .target import add_target_task, anisotropic_route, average_route, mixture_stats
from .trainer import AdaptationTrainer

__all__ = [
    "OBJECTIVES",
    "AdaptResult",
    "AdaptationError",
    "AdaptationObjective",
    "AdaptationTrainer",
    "adapt",
    "OptionRange",
    "add_target_task",
    "anisotropic_route",
    "average_route",
    "check_objective_options",
    "diagnose_objectives",
    "make_objective",
    "mixture_stats",
    "objective_class",
    "objective_names",
    "objective_summary",
    "reestimate_norm_stats",
    "register_objective",
    "route_relation",
    "save_relation_heatmap",
    "source_distances",
    "summary_lines",
]
