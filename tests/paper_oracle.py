"""Test oracle: re-implementation of the published merge code of Sung et al. 2023.

"An Empirical Study of Multimodal Model Merging" ships its merging code in
``ylsung/vl-merging``, ``src/vilt/modules/vilt_module.py`` (the version
read for this module is commit 11ecc617, the one whose interpolation/arithmetic
modality selection has an ``nlvr2`` branch).  The three methods
``ViLTransformerSS.merge_weights`` (interpolation), ``sum_task_vectors``
(modality arithmetic) and ``regmean`` are re-implemented here as plain
functions on in-memory state dicts.  This is a *test oracle* for equivalence
tests of ``vlmerge``: it reproduces the paper's behaviour, quirks included,
rather than what the paper's text says.  It is not meant for production use
and is written for clarity, not speed.

Changes from the original that do not alter results:

* No ``torch.load``: the checkpoint, the central (seed) weights and the Gram
  matrices are passed in as dicts.
* ``num_layers`` is an argument (the paper hard-codes ``range(12)``), and the
  config flags become arguments: ``fusion_layer`` = ``vlffn_start_layer_index``,
  ``ratio`` = ``merge_ratio``, ``lam`` = ``sum_lambda``,
  ``alpha`` = ``scaling_for_non_diag``; ``task`` selects
  ``only_activate_used_experts`` / ``loss_names`` (see ``_TASKS``).
* ``torch.linalg.inv`` instead of the deprecated ``torch.inverse`` (same op).
* With ``alias_bug=True`` the in-place update works on a clone of each central
  tensor, so the caller's ``central`` dict is left alone.  The paper mutates a
  copy it has just loaded from disk, so results are the same.

Quirks reproduced (all on purpose):

1. Pass-through rule: a source key is copied unchanged (same tensor object)
   when it does not contain ``"transformer.blocks."`` or contains ``"gamma"``.
   Any other key inside the blocks that is not one of the merged slots below
   (e.g. a per-block relative position table) is **dropped**, and the
   per-expert source keys are never copied to the output.
2. Per block, the slots are merged in this order: ``attn.qkv.weight``,
   ``attn.proj.{weight,bias}``, ``attn.{q_bias,v_bias}``,
   ``mlp.fc1.{weight,bias}``, ``mlp.fc2.{weight,bias}``,
   ``norm1.{weight,bias}``, ``norm2.{weight,bias}``.  Experts are visited in
   the order ``v, l, vl``.
3. Shared sub-modules: if an expert key ``...{m}...`` is missing, the merged
   name is read from the *source* dict (e.g. ``transformer.blocks.{i}.attn.qkv
   .weight``) and copied unchanged, dropping any partial sum.  If it is missing
   too, this raises ``KeyError``, as the paper's code does.
4. Expert selection for interpolation and arithmetic: below the fusion layer
   ``[v, l]``; at or above it ``[v, l, vl]`` when
   ``only_activate_used_experts`` is off (task ``"all"``), else ``[v, l]``
   for irtr (retrieval) and ``[vl]`` for vqa and nlvr2.
5. Interpolation ratios: one expert -> 1 (the int); two -> ``v: r, l: 1-r``;
   three -> ``v: 2/3 r, l: 2/3 (1-r), vl: 1/3``.  The sum starts at the int 0
   and is updated in place after the first term.
6. Arithmetic ratios: ``lam`` for each expert when there are two or three, but
   **1 (not lam)** when only one expert is used (vqa/nlvr2 above the fusion
   layer), so that slot becomes ``theta0 + (theta_vl - theta0)``.  The central
   tensor must exist under the merged name even for slots that later fall back
   to a shared source tensor (it is read first), otherwise ``KeyError``.
7. Arithmetic aliasing (``alias_bug=True``): the paper starts the sum *as* the
   central tensor and updates it in place, so each later task vector is taken
   against the already moved origin:
   ``acc <- acc + r_m * (theta_m - acc)``.  ``alias_bug=False`` gives the
   intended ``theta0 + sum_m r_m (theta_m - theta0)``.
8. RegMean expert selection does **not** look at ``only_activate_used_experts``:
   below the fusion layer ``[v, l]``; else irtr -> ``[v, l]``; elif vqa ->
   ``[vl]``; else ``[v, l, vl]``.  So ``"nlvr2"`` merges all three experts in
   RegMean (unlike interpolation/arithmetic, where it uses only ``vl``).  Task
   ``"all"`` sets no irtr/vqa loss flag, so it also gives all three.
9. RegMean only applies to the linear weights (qkv, proj, fc1, fc2).
   ``merged = (sum_m W_m G_m) @ inv(sum_m G_m)`` with ``W`` cast to float64 and
   ``G_m = alpha * G + (1 - alpha) * diag(G)`` (off-diagonals shrunk by alpha).
   The result stays **float64**.  Grams are used in the dtype given (the
   paper's gram files are float64; a float32 gram fails in ``matmul`` here just
   as it does there).  Gram keys: ``transformer.blocks.{i}.attn.{m}`` (input
   of qkv), ``...attn.{m}.proj``, ``...mlp.{m}.fc1``, ``...mlp.{m}.fc2``.
10. RegMean with a missing gram: that expert is skipped for that weight, but
    its bias is still counted in the plain bias average.  If every gram for a
    weight is missing, the output is the Python int ``0``, as in the paper.
11. RegMean biases (proj/fc1/fc2 bias, q_bias, v_bias) and LayerNorm
    weight/bias are plain averages ``sum / count`` in their source dtype.  If
    the shared fallback (3) happens after some experts were already counted,
    the fallback tensor is still divided by that count (weights: multiplied by
    the inverse of the partial Gram sum).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

__all__ = ["paper_interpolation", "paper_arithmetic", "paper_regmean"]

# task -> what the paper's config flags mean.  For interpolation/arithmetic:
# "all" = only_activate_used_experts False; the others = True with
# loss_names irtr / vqa / nlvr2 turned on.
_TASKS = ("all", "retrieval", "vqa", "nlvr2")


class _Slot(NamedTuple):
    merged: str  # modality-agnostic (merged) name; also the shared-module name
    expert: str  # format string with {m} for the per-expert source name
    gram: str | None  # format string with {m} for the gram key, None = not RegMean'd


def _check_task(task: str) -> None:
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")


def _slots(i: int) -> list[_Slot]:
    """Merged parameter slots of block ``i``, in the paper's order."""
    b = f"transformer.blocks.{i}"
    return [
        _Slot(f"{b}.attn.qkv.weight", b + ".attn.{m}.qkv.weight", b + ".attn.{m}"),
        _Slot(f"{b}.attn.proj.weight", b + ".attn.{m}.proj.weight", b + ".attn.{m}.proj"),
        _Slot(f"{b}.attn.proj.bias", b + ".attn.{m}.proj.bias", None),
        _Slot(f"{b}.attn.q_bias", b + ".attn.{m}.q_bias", None),
        _Slot(f"{b}.attn.v_bias", b + ".attn.{m}.v_bias", None),
        _Slot(f"{b}.mlp.fc1.weight", b + ".mlp.{m}.fc1.weight", b + ".mlp.{m}.fc1"),
        _Slot(f"{b}.mlp.fc1.bias", b + ".mlp.{m}.fc1.bias", None),
        _Slot(f"{b}.mlp.fc2.weight", b + ".mlp.{m}.fc2.weight", b + ".mlp.{m}.fc2"),
        _Slot(f"{b}.mlp.fc2.bias", b + ".mlp.{m}.fc2.bias", None),
        _Slot(f"{b}.norm1.weight", b + ".norm1.{m}.weight", None),
        _Slot(f"{b}.norm1.bias", b + ".norm1.{m}.bias", None),
        _Slot(f"{b}.norm2.weight", b + ".norm2.{m}.weight", None),
        _Slot(f"{b}.norm2.bias", b + ".norm2.{m}.bias", None),
    ]


def _passthrough(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Quirk 1: keep keys outside the blocks plus every ``gamma`` key."""
    return {k: v for k, v in state_dict.items() if "transformer.blocks." not in k or "gamma" in k}


def _experts_present(state_dict, slot: _Slot, modalities):
    """Walk the experts in order and stop at the first missing one.

    Returns ``(present, fell_back)``: ``present`` lists ``(m, tensor)`` for the
    experts found before the first missing key; ``fell_back`` is True when a
    key was missing, in which case the paper switches to the shared tensor
    ``state_dict[slot.merged]`` (quirk 3).
    """
    present = []
    for m in modalities:
        key = slot.expert.format(m=m)
        if key not in state_dict:
            return present, True
        present.append((m, state_dict[key]))
    return present, False


def _experts_interp_arith(layer: int, fusion_layer: int, task: str) -> list[str]:
    """Quirk 4 (merge_weights / sum_task_vectors)."""
    if layer < fusion_layer:
        return ["v", "l"]
    if task == "all":  # only_activate_used_experts = False
        return ["v", "l", "vl"]
    if task == "retrieval":  # loss_names["irtr"] > 0
        return ["v", "l"]
    return ["vl"]  # loss_names["vqa"] > 0 or loss_names["nlvr2"] > 0


def _experts_regmean(layer: int, fusion_layer: int, task: str) -> list[str]:
    """Quirk 8: the paper's regmean never checks only_activate_used_experts.

    Its rule is: below the fusion layer [v, l]; elif loss_names["irtr"] -> [v, l];
    elif loss_names["vqa"] -> [vl]; else [v, l, vl].  The nlvr2 task (and "all",
    which has no irtr/vqa flag) therefore falls into the last branch and merges
    all three experts, unlike interpolation/arithmetic where nlvr2 uses [vl].
    """
    if layer < fusion_layer:
        return ["v", "l"]
    if task == "retrieval":
        return ["v", "l"]
    if task == "vqa":
        return ["vl"]
    return ["v", "l", "vl"]  # "nlvr2" and "all"


# ---------------------------------------------------------------------------
# Interpolation (merge_weights)
# ---------------------------------------------------------------------------


def _interp_ratios(modalities: list[str], ratio: float) -> dict[str, float]:
    """Quirk 5."""
    if len(modalities) == 1:
        return {modalities[0]: 1}
    if len(modalities) == 3:
        return {"v": (2 / 3) * ratio, "l": (2 / 3) * (1 - ratio), "vl": 1 / 3}
    return {"v": ratio, "l": 1 - ratio}


def paper_interpolation(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    fusion_layer: int,
    ratio: float,
    task: str,
) -> dict[str, torch.Tensor]:
    """Paper's ``merge_weights``: a weighted sum of the experts for each slot."""
    _check_task(task)
    out = _passthrough(state_dict)
    for i in range(num_layers):
        modalities = _experts_interp_arith(i, fusion_layer, task)
        weights = _interp_ratios(modalities, ratio)
        for slot in _slots(i):
            present, fell_back = _experts_present(state_dict, slot, modalities)
            if fell_back:
                out[slot.merged] = state_dict[slot.merged]
                continue
            acc = 0  # the paper starts from the int 0; 0 + t is a new tensor
            for m, tensor in present:
                acc += weights[m] * tensor
            out[slot.merged] = acc
    return out


# ---------------------------------------------------------------------------
# Modality arithmetic (sum_task_vectors)
# ---------------------------------------------------------------------------


def _arith_ratios(modalities: list[str], lam: float) -> dict[str, float]:
    """Quirk 6: a lone expert gets ratio 1, not lam."""
    if len(modalities) == 1:
        return {modalities[0]: 1}
    return {m: lam for m in modalities}


def paper_arithmetic(
    state_dict: Mapping[str, torch.Tensor],
    central: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    fusion_layer: int,
    lam: float,
    task: str,
    alias_bug: bool = False,
) -> dict[str, torch.Tensor]:
    """Paper's ``sum_task_vectors``: theta0 + sum_m r_m (theta_m - theta0).

    ``central`` is the seed (modality-agnostic) state dict, keyed by merged
    names.  ``alias_bug=True`` reproduces the paper's in-place ``+=`` on the
    central tensor (quirk 7); ``central`` itself is not changed either way.
    """
    _check_task(task)
    out = _passthrough(state_dict)
    for i in range(num_layers):
        modalities = _experts_interp_arith(i, fusion_layer, task)
        weights = _arith_ratios(modalities, lam)
        for slot in _slots(i):
            origin = central[slot.merged]  # read before anything else (quirk 6)
            present, fell_back = _experts_present(state_dict, slot, modalities)
            if fell_back:
                out[slot.merged] = state_dict[slot.merged]
                continue
            if alias_bug:
                # `moving` plays the role of central_weight[name] in the paper:
                # the sum and the origin are the same tensor.
                moving = origin.detach().clone()
                for m, tensor in present:
                    moving += weights[m] * (tensor - moving)
                out[slot.merged] = moving
            else:
                acc = origin
                for m, tensor in present:
                    acc = acc + weights[m] * (tensor - origin)
                out[slot.merged] = acc
    return out


# ---------------------------------------------------------------------------
# RegMean (regmean)
# ---------------------------------------------------------------------------


def _shrink_offdiag(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``scale_G``: alpha * G + (1 - alpha) * diag(G)."""
    diag_only = torch.diag_embed(torch.diag(gram))
    return alpha * gram + (1 - alpha) * diag_only


def _regmean_weight(state_dict, grams, slot: _Slot, modalities, alpha):
    present, fell_back = _experts_present(state_dict, slot, modalities)
    gram_sum = 0
    numerator = 0
    for m, weight in present:
        gram_key = slot.gram.format(m=m)
        if gram_key not in grams:  # quirk 10: skip this expert
            continue
        g = _shrink_offdiag(grams[gram_key], alpha)
        gram_sum += g
        numerator += torch.matmul(weight.to(torch.float64), g)
    if fell_back:
        numerator = state_dict[slot.merged]
    if isinstance(gram_sum, int):  # no gram used: shared tensor, or int 0
        return numerator
    return torch.matmul(numerator, torch.linalg.inv(gram_sum))


def _regmean_average(state_dict, slot: _Slot, modalities):
    present, fell_back = _experts_present(state_dict, slot, modalities)
    total = 0
    for _, tensor in present:
        total += tensor
    if fell_back:
        total = state_dict[slot.merged]
    if not present:
        return total
    return total / len(present)


def paper_regmean(
    state_dict: Mapping[str, torch.Tensor],
    grams: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    fusion_layer: int,
    alpha: float,
    task: str,
) -> dict[str, torch.Tensor]:
    """Paper's ``regmean``: Gram-weighted linear weights, averaged the rest.

    ``grams`` is keyed like the paper's gram files (quirk 9); linear weights
    come back as float64, everything else in its source dtype.
    """
    _check_task(task)
    out = _passthrough(state_dict)
    for i in range(num_layers):
        modalities = _experts_regmean(i, fusion_layer, task)
        for slot in _slots(i):
            if slot.gram is not None:
                out[slot.merged] = _regmean_weight(state_dict, grams, slot, modalities, alpha)
            else:
                out[slot.merged] = _regmean_average(state_dict, slot, modalities)
    return out
