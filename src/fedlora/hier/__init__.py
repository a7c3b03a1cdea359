"""HierFedLoRA's planning, pure numpy: near-IID client groups and each group's ``(tau_g, L_g)``.

``grouping`` splits clients into ``G`` groups whose pooled label histograms are close to the global one
(METHODS.md, "HierFedLoRA", part 1); ``planner`` picks each group's sync period and depth so that a
global round takes about as long in every group, at the best modelled progress per second (part 4). Both
are deterministic and import nothing from the rest of fedlora.
"""

from .grouping import Grouping, group_clients, kl_divergence, l1_distance, mixed_histogram, regroup
from .planner import (
    GroupCosts,
    GroupPlan,
    Plan,
    default_progress,
    fixed_plan,
    plan_groups,
    replan,
)

__all__ = [
    "GroupCosts",
    "GroupPlan",
    "Grouping",
    "Plan",
    "default_progress",
    "fixed_plan",
    "group_clients",
    "kl_divergence",
    "l1_distance",
    "mixed_histogram",
    "plan_groups",
    "regroup",
    "replan",
]
