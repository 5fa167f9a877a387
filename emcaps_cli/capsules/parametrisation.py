"""How the learned β_u, β_a and the inverse temperature enter a layer's EM routing.

Procedure 1's activation is a_j = logistic(λ(β_a − Σ_h (β_u + log σ_h) Σ_i R_ij)).

* "paper": β_u, β_a are the parameters themselves, initialised to 0; λ_max = final_lambda;
  W ~ N(0, 1/q).
* "released": the form of the authors' released code (google-research `capsule_em`,
  `em_layers.py`), whose logit is β_t (Σ_i R_ij (−Σ_h log σ²_h − 16 s_b (ln 2π + 1)) − 5000 a_b)
  with parameters s_b ("sigma_biases") and a_b ("activation_biases"). Written in Procedure 1's
  form it is λ = 2 β_t, β_u = s_b (ln 2π + 1)/2, β_a = −2500 a_b; the class layer uses β_t/4.
  Initial s_b, a_b: 0.5, 0.5 in the conv capsules and 2.0, 1.0 in the class capsules; W std 0.3
  (conv) and 0.01 (class). Not reproduced: the code's M-step mean smoothing (0.9 new + 0.1 old);
  its variance floor of 5e-4 is `var_floor` (the "released" preset sets it).
* Either form's class-capsule β_a can be scaled once more (`beta_a_scale`:
  `ModelConfig.class_beta_a_scale`, default 1000 for "paper"; the conv capsules use 1): the
  parameter then moves the threshold that many times faster under Adam (docs/model.md, "Where
  emcaps departs from the paper and the released code", row "class β_a scale").
"""

from __future__ import annotations

import math

import torch

from emcaps_cli.defaults import PARAMETRISATIONS  # noqa: F401 (re-exported)

_U_SCALE = (math.log(2 * math.pi) + 1) / 2  # β_u per unit of s_b
_A_SCALE = -2500.0  # β_a per unit of a_b
# layer kind -> (initial s_b, initial a_b, W std, λ multiplier), released form
_RELEASED = {"conv": (0.5, 0.5, 0.3, 2.0), "class": (2.0, 1.0, 0.01, 0.5)}


def initialise_parameters(
    kind: str, layer: str, beta_u: torch.Tensor, beta_a: torch.Tensor, transforms: torch.Tensor
) -> None:
    """Set a fresh layer's parameters in place for parametrisation `kind` ("conv"/"class")."""
    if kind == "paper":
        return  # as built: β = 0, W ~ N(0, 1/q)
    sb, ab, w_std, _ = _RELEASED[layer]
    with torch.no_grad():
        beta_u.fill_(sb)
        beta_a.fill_(ab)
        transforms.normal_(0.0, w_std)


def effective_parameters(
    kind: str,
    layer: str,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    final_lambda: float,
    beta_a_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(β_u, β_a, λ_max) in Procedure 1's form, from the layer's parameters; β_a is further
    multiplied by `beta_a_scale` (the class capsules' `class_beta_a_scale`; 1 elsewhere)."""
    if kind == "paper":
        lam = final_lambda
    else:
        lam = _RELEASED[layer][3] * final_lambda
        beta_u, beta_a = beta_u * _U_SCALE, beta_a * _A_SCALE
    if beta_a_scale != 1:
        beta_a = beta_a * beta_a_scale  # Adam moves β_a beta_a_scale times faster
    return beta_u, beta_a, lam
