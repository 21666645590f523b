"""RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging"): RegMean whose Gram matrices of layer l come from the inputs
that the already-merged layers below l produce, not from each expert's own lower layers.

Within a layer the choice is FusionBench's (`method/regmean_plusplus`): layer l's experts are run,
unmerged, on the merged lower layers' output, so the inputs of proj, fc1 and fc2 are those of the
expert's own attention and FFN in that layer; the layer is then merged and the next one collected
from its output. Here a merged layer is written into every expert of that layer, which makes the
multiway model compute what the merged one does below l (the routing is the same graph).

The sequential part is a collection pass (`vlmerge grams --sequential`, `collect_sequential_grams`)
that merges as it goes, with RegMean's own solve (`methods.regmean`), and writes an ordinary Gram file
whose provenance records that it is sequential and with which options (alpha, selection): the
lower layers it merged depend on both. The merge itself (`regmean_pp`) is then RegMean on those
matrices, streamed tensor by tensor like any other, and refuses a Gram file that is not sequential
or was collected with other options. Its result equals the pass's own merge.

The pass costs depth truncated forward passes over the data (layer l's forward stops once l is
done), about depth / 2 times a RegMean Gram pass.
"""

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError, MergeError
from vlmerge.core.keys import parse_block_path
from vlmerge.core.threads import one_thread
from vlmerge.merging.grams import GramCollector
from vlmerge.merging.methods import RegMeanOptions, regmean
from vlmerge.merging.plan import ExpertSelection, MergeGroup, build_merge_plan, merged_key, parse_expert_key
from vlmerge.merging.registry import MergeInputs, MergeWarning, Statistics, StatisticsFile, register_method

SEQUENTIAL = "sequential"  # the provenance entry of a sequential Gram file: its SequentialOptions


class SequentialOptions(StrictConfig):
    """The merge a sequential Gram pass performs layer by layer; the final merge must use the same."""

    alpha: float = Field(1.0, ge=0.0, le=1.0, description="RegMean's off-diagonal scale of each Gram matrix")
    selection: ExpertSelection = ExpertSelection.ALL


def check_sequential(grams: StatisticsFile, options: RegMeanOptions, selection: str) -> None:
    """The Gram file was collected sequentially (`vlmerge grams --sequential`) with this merge's options."""
    wanted = SequentialOptions(alpha=options.alpha, selection=selection)
    command = f"`vlmerge grams --sequential --alpha {wanted.alpha} --selection {wanted.selection.value}`"
    recorded = grams.provenance.get(SEQUENTIAL)
    if not isinstance(recorded, dict):
        raise MergeError(
            f"Gram file {grams.path} is not sequential: its matrices come from each expert's own lower layers, "
            f"and regmean_pp needs those of the already-merged ones; collect them with {command}"
        )
    if recorded != wanted.model_dump(mode="json"):
        found = ", ".join(f"{name} {value}" for name, value in sorted(recorded.items()))
        raise MergeError(
            f"Gram file {grams.path} was collected sequentially with {found}, but this merge uses "
            f"alpha {wanted.alpha}, selection {wanted.selection.value}: its lower layers were merged otherwise; "
            f"merge with those options, or collect again with {command}"
        )


@register_method("regmean_pp", RegMeanOptions, statistics=Statistics.GRAMS, check_statistics=check_sequential)
def regmean_pp(inputs: MergeInputs, options: RegMeanOptions) -> torch.Tensor:
    """RegMean++ (Nguyen et al. 2025): RegMean on Gram matrices from the already-merged lower layers."""
    return regmean(inputs, options)


# --------------------------------------------------------------------------- the sequential pass
class _LayerDone(Exception):
    """Raised by the next block's pre-hook: the layer being collected has seen every stream."""


@one_thread()  # the same bytes on every machine (core/threads.py)
def collect_sequential_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    options: SequentialOptions,
    *,
    normalize: bool = False,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Gram matrices layer by layer, each from the output of the layers below merged by RegMean.

    `batches` is iterated once per layer (a list, or an object whose iteration starts over). The
    model is not changed: the pass merges into a copy. Returns what `collect_grams` does."""
    if iter(batches) is batches:
        raise ConfigError("the sequential Gram pass reads the batches once per layer; pass a list, not an iterator")
    work = copy.deepcopy(model).eval()
    parameters = dict(work.named_parameters())
    plan = build_merge_plan({k: tuple(v.shape) for k, v in work.state_dict().items()}, options.selection)
    grams: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for layer in tqdm(range(len(work.blocks)), desc="sequential grams", disable=not progress, unit="layer"):
        layer_grams, layer_info = _layer_grams(work, layer, batches, normalize)
        grams |= layer_grams
        info |= layer_info
        if layer + 1 < len(work.blocks):  # the last layer's merge feeds nothing
            merged = {
                g.target: _merge_group(g, parameters, layer_grams, options.alpha)
                for g in plan.groups
                if g.layer == layer
            }
            _write_merged(parameters, layer, merged)
    return grams, info


def _layer_grams(
    model: nn.Module, layer: int, batches: Iterable[Mapping[str, torch.Tensor]], normalize: bool
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The Gram matrices of one layer's linear layers, the forward stopped once that layer is done."""
    collector = GramCollector(model)
    collector.modules = {name: entry for name, entry in collector.modules.items() if _layer_of(name) == layer}
    stop = None
    if layer + 1 < len(model.blocks):  # every stream has passed layer l once the next block starts
        stop = model.blocks[layer + 1].register_forward_pre_hook(_raise_layer_done)
    try:
        with collector, torch.no_grad():
            for batch in batches:
                try:
                    model(**batch)
                except _LayerDone:
                    pass
            collector.all_reduce()
    finally:
        if stop is not None:
            stop.remove()
    return collector.result(normalize)


def _raise_layer_done(module: nn.Module, args: tuple) -> None:
    raise _LayerDone


def _layer_of(module: str) -> int | None:
    path = parse_block_path(module)
    return path.layer if path is not None else None


def _merge_group(
    group: MergeGroup, parameters: Mapping[str, torch.Tensor], grams: Mapping[str, torch.Tensor], alpha: float
) -> torch.Tensor:
    """As the engine merges the group with `regmean_pp` from the Gram file this pass writes: a single
    expert is copied, linear weights are solved with their Gram matrices, the rest averaged."""
    experts = {m: parameters[e.key].detach().cpu() for m, e in group.experts.items()}
    if len(experts) == 1:
        return next(iter(experts.values()))
    matrices = {m: grams.get(module) for m, module in group.gram_keys().items()} if group.is_linear_weight else None
    with warnings.catch_warnings():  # the fallbacks are the merge's: it reports them when it runs
        warnings.simplefilter("ignore", MergeWarning)
        return regmean(MergeInputs(group.target, experts, grams=matrices), RegMeanOptions(alpha=alpha))


def _write_merged(parameters: Mapping[str, nn.Parameter], layer: int, merged: Mapping[str, torch.Tensor]) -> None:
    """Every expert of `layer` (those the selection drops too) takes its merged tensor, so the layer
    computes what the merged model's does, whichever expert a token is routed to."""
    with torch.no_grad():
        for key, parameter in parameters.items():
            path = parse_expert_key(key)
            if path is not None and path.layer == layer:
                parameter.copy_(merged[merged_key(key)].to(parameter.device, parameter.dtype))
