"""(epsilon, delta) accounting of the subsampled Gaussian mechanism, through Opacus's own accountants.

A client running DP-SGD takes ``steps`` noisy steps, each on a Poisson sample of its ``n`` examples at rate
``q = batch_size / n``, with noise ``sigma * clip``. Its privacy loss over the whole run is what Opacus's
accountant (``"rdp"``: Renyi DP, or ``"prv"``: privacy random variables, tighter) says of the history
``[(sigma, q, steps)]``; fedlora computes nothing of its own, so the numbers can be checked against Opacus.

``delta`` must be below ``1 / n`` of the smallest client (a mechanism that publishes one random record
outright is ``(0, 1/n)``-DP, so a larger delta promises nothing); the default is ``1 / (10 n)``. Epsilon is
always reported at the same delta the noise was calibrated for.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

ACCOUNTANTS = ("rdp", "prv")


def default_delta(smallest_client: int) -> float:
    """``1 / (10 n)`` for the smallest client's ``n`` examples."""
    if smallest_client < 1:
        raise ValueError(f"privacy: a client holds {smallest_client} examples; DP needs at least one")
    return 1.0 / (10 * smallest_client)


def check_delta(delta: float, smallest_client: int) -> float:
    """``delta`` if ``0 < delta < 1/n`` (``n``: the smallest client's examples), else a one-line ValueError."""
    if not 0 < delta < 1.0 / smallest_client:
        raise ValueError(f"privacy.delta={delta:g} must be > 0 and below 1/n = {1.0 / smallest_client:.3g} of the "
                         f"smallest client's {smallest_client} examples (a delta of 1/n or more protects no one)")
    return delta


@contextmanager
def _quiet():
    """Opacus warns when the best RDP order is its largest; the bound is still valid (only possibly loose),
    and the library prints nothing of its own: silenced here, documented in docs/privacy.md."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant: expected one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """The smallest ``sigma`` (within Opacus's search tolerance) whose ``steps`` steps at ``sample_rate``
    spend at most ``target_epsilon`` at ``delta``."""
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise ValueError(f"privacy.target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"privacy: sample rate {sample_rate} must be in (0, 1] and steps {steps} >= 1")
    _accountant(accountant)
    with _quiet():
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))


def epsilon_spent(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after the steps ``history = [(sigma, sample_rate, steps), ...]`` (0 if none)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    acc = _accountant(accountant)
    acc.history = history
    with _quiet():
        return float(acc.get_epsilon(delta=delta))
