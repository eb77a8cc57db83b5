"""Request demand per model: an exponentially decayed rate, gossiped in each node's record.

Each node counts the API requests it receives per model (`observe`) and publishes the rate in
requests per minute (`rates`), decayed with the half-life it is given (`demand_half_life_s` of
the node's config, a minute by default), so a burst fades within minutes. The placement logic
sums the rates of all records to prefer, when a standby node is promoted, the wanted model with
the most demand. Sans-I/O: time is an input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

DEMAND_FLOOR_PER_MIN = 0.01  # rates below this are dropped from the record


@dataclass(slots=True)
class DemandMeter:
    """Decayed request counts per model (the rate is count × decay constant, per minute)."""

    half_life_s: float
    _level: dict[str, float] = field(default_factory=dict)
    _at: float = 0.0
    _decay_per_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._decay_per_s = math.log(2) / self.half_life_s

    def observe(self, model: str, now: float) -> None:
        self._decay(now)
        self._level[model] = self._level.get(model, 0.0) + 1.0

    def rates(self, now: float) -> dict[str, float]:
        """Requests per minute per model, rounded to 2 decimals; tiny rates are left out."""
        self._decay(now)
        per_min = {
            m: round(level * self._decay_per_s * 60.0, 2) for m, level in self._level.items()
        }
        return {m: rate for m, rate in per_min.items() if rate >= DEMAND_FLOOR_PER_MIN}

    def _decay(self, now: float) -> None:
        if now <= self._at:
            return
        factor = math.exp(-self._decay_per_s * (now - self._at))
        self._level = {m: v * factor for m, v in self._level.items() if v * factor > 1e-6}
        self._at = now


def rates_changed(old: Mapping[str, float], new: Mapping[str, float]) -> bool:
    """Worth republishing: a model appeared/vanished or a rate moved by more than 20 %."""
    if old.keys() != new.keys():
        return True
    return any(abs(new[m] - old[m]) > 0.2 * max(old[m], 0.1) for m in new)


def mesh_demand(demands: list[Mapping[str, float]]) -> dict[str, float]:
    """The mesh-wide rate per model: the sum over every node's record."""
    total: dict[str, float] = {}
    for demand in demands:
        for model, rate in demand.items():
            total[model] = total.get(model, 0.0) + rate
    return total
