"""One capsule layer's routing settings, as every part of the routing takes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emcaps_cli.capsules.em import VAR_FLOOR, ChildMap


@dataclass(frozen=True)
class RoutingSpec:
    iters: int
    final_lambda: float
    child_map: ChildMap | None
    rows: int
    row_len: int
    # Route as many images at a time as keep one chunk's vote tensor within this many elements
    # (at least one image; 0 routes the whole batch at once; None: the backend's own budget,
    # RoutingBackend.chunk_budget).
    chunk_elements: int | None = None
    var_floor: float = VAR_FLOOR  # added to every σ² (routing.m_step)
    likelihood_power: float = 1.0  # τ of the E-step, R ∝ a p^τ (routing.e_step_logits)

    def loop_options(self) -> dict[str, Any]:
        """The routing loop's settings, as keywords of routing.routing_iterations/em_routing."""
        return {
            "iters": self.iters,
            "final_lambda": self.final_lambda,
            "child_map": self.child_map,
            "var_floor": self.var_floor,
            "likelihood_power": self.likelihood_power,
        }
