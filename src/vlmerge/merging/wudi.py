"""WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It").

Per 2-D weight, the merged modality vector tau minimises the interference it causes on each
expert's own inputs, which the expert's vector tau_m = theta_m - theta_0 stands in for (its rows
span the inputs the expert learned from):

    L(tau) = sum_m ||(tau - tau_m) tau_m^T||_F^2 / ||tau_m||_F^2.

L is RegMean's objective with G_m = tau_m^T tau_m / ||tau_m||_F^2 in place of the data Gram matrix, so
its minimum is RegMean's solve, tau = (sum_m tau_m G_m)(sum_m G_m)^+. The paper reaches it with Adam
from sum_m tau_m (`solver: iterative`, FusionBench's `wudi_merging`); `closed` solves it outright.
Tensors that are not 2-D take the mean of the modality vectors, as FusionBench does. The result is
theta_0 + lam * tau; FusionBench adds tau unscaled (lam 1).
"""

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.merging.registry import MergeInputs, register_method
from vlmerge.merging.svd import COMPUTE_DTYPE, singular_components, svd_merge

STEPS = 300  # FusionBench's `wudi_merging` default (its method config sets 400)
LR = 1e-5  # FusionBench's Adam learning rate


class WudiOptions(StrictConfig):
    solver: Literal["closed", "iterative"] = Field(
        "closed", description="closed: the exact minimum, float64; iterative: the paper's Adam steps from the sum"
    )
    steps: int = Field(STEPS, ge=1, le=100_000, description="Adam steps of the iterative solver")
    lr: float = Field(LR, gt=0.0, le=1.0, description="Adam learning rate of the iterative solver")
    lam: float = Field(1.0, description="scale of the merged modality vector")


@register_method("wudi", WudiOptions, needs_origin=True, compute_bound=True)
def wudi(inputs: MergeInputs, options: WudiOptions) -> torch.Tensor:
    """WUDI (Cheng et al., ICML 2025): per 2-D weight, min Σₘ ‖(τ − τₘ)τₘᵀ‖² / ‖τₘ‖², solved exactly or by Adam."""
    if options.solver == "closed":
        return svd_merge(inputs, options.lam, "mean", lambda vectors: wudi_closed_form(vectors, inputs.target))
    return wudi_iterative_merge(inputs, options)


def wudi_closed_form(vectors: Sequence[torch.Tensor], target: str) -> torch.Tensor:
    """tau = (sum_m tau_m G_m)(sum_m G_m)^+, the minimum-norm minimiser, without forming a Gram matrix.

    With S_m = tau_m / ||tau_m|| stacked into T = [S_1; ...; S_M] = U diag(s) V^T (thin, numerically zero
    singular values dropped), sum_m G_m = T^T T and sum_m tau_m G_m = sum_m tau_m S_m^T U_m diag(s) V^T for
    U_m the rows of U that belong to S_m, so tau = (sum_m tau_m S_m^T U_m) diag(1/s) V^T. This divides by s
    where the normal equations would divide by s^2, and a sum that is singular (a wide weight with fewer
    experts than in/out, or repeated experts) gets the pseudo-inverse. A zero tau_m has no term."""
    live = [v for v in vectors if bool(v.any())]
    if not live:
        return torch.zeros_like(vectors[0])
    units = [v / torch.linalg.vector_norm(v) for v in live]
    u, s, vh = singular_components(torch.cat(units), target)  # (M out, r), (r,), (r, in)
    weighted = sum(v @ (unit.mT @ block) for v, unit, block in zip(live, units, u.split(len(live[0]))))
    return (weighted / s) @ vh  # (out, r) diag(1/s) (r, in)


def wudi_iterative_merge(inputs: MergeInputs, options: WudiOptions) -> torch.Tensor:
    """theta_0 + lam * tau, tau from the Adam steps (2-D) or the mean (other tensors); in float32, float64
    for float64 experts, returned in the experts' dtype."""
    dtype = next(iter(inputs.experts.values())).dtype
    compute = COMPUTE_DTYPE if dtype == COMPUTE_DTYPE else torch.float32
    origin = inputs.origin.to(compute)
    stacked = torch.stack([w.to(compute) - origin for w in inputs.experts.values()])  # (M, *shape)
    if origin.ndim == 2:
        merged = wudi_adam(stacked, options.steps, options.lr)
    else:
        merged = torch.sum(stacked, dim=0) / len(stacked)
    return (origin + options.lam * merged).to(dtype)


def wudi_adam(vectors: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """FusionBench's `wudi_merging` for one (M, out, in) stack of modality vectors: Adam from their sum on
    the loss as it writes it; zero vectors (which it would divide by) are left out of the loss."""
    live = vectors[vectors.flatten(1).any(dim=1)]
    with torch.inference_mode(False), torch.enable_grad():
        live = live.clone()  # a tensor made under inference mode cannot enter autograd
        merged = torch.nn.Parameter(torch.sum(vectors, dim=0).clone())
        if len(live) == 0:
            return merged.detach()
        optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
        norms = torch.square(torch.norm(live.reshape(live.shape[0], -1), p=2, dim=-1))
        for _ in range(steps):
            disturbing = merged.unsqueeze(0) - live  # (M, out, in)
            product = torch.matmul(disturbing, live.transpose(1, 2))  # (M, out, out)
            loss = torch.sum(torch.square(product) / norms.unsqueeze(-1).unsqueeze(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return merged.detach()
