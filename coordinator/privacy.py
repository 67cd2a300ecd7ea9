"""The privacy a central-DP run has spent: epsilon at a fixed delta after each round.

Each committed round applied the Gaussian mechanism (noise multiplier z) to the updates
of a cohort drawn from the registered population, so the accounting composes one
Poisson-sampled Gaussian event per round, at sampling probability cohort / population,
with Rényi-DP (``dp_accounting``'s RDP accountant), as TFF's DP tutorials do. Devices
here are not sampled at random but by who checks in, so this is the figure the
mechanism would give under that assumption, not a proof about this fleet.
"""

from __future__ import annotations

from collections.abc import Sequence

DELTA = 1e-5


def epsilons(noise_multiplier: float, cohorts: Sequence[tuple[int, int]], delta: float = DELTA) -> list[float]:
    """Epsilon after each round, given each round's (updates aggregated, population)."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    spent = []
    for clients, population in cohorts:
        q = min(1.0, clients / max(population, 1))
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)))
        spent.append(float(accountant.get_epsilon(delta)))
    return spent
