"""Differential privacy and bounded updates: accounting (Opacus's accountants) and update norms in factored form.

Imports no model, data, engine or CLI code: the protocol, the clients and the server use it alike.
"""

from .accounting import ACCOUNTANTS, check_delta, default_delta, epsilon_spent, noise_multiplier
from .bounds import UpdateBound, bound_updates, clip_update, towards_head, update_norm
from .client_level import ClientDP, Release, release

__all__ = [
    "ACCOUNTANTS", "ClientDP", "Release", "UpdateBound", "bound_updates", "check_delta", "clip_update", "default_delta",
    "epsilon_spent",
    "noise_multiplier", "release", "towards_head", "update_norm",
]
