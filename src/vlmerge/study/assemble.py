"""The typed study results from a plan and its stages' outputs: bookkeeping and statistics, nothing is run."""

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from vlmerge.study.cache import StageOutput
from vlmerge.study.claims import better, pretraining_gain
from vlmerge.study.observations import HELDOUT, HELDOUT_HEADLINE, Observations, path_protocol
from vlmerge.study.plan import DOSE_CONDITIONS, PlannedModel, StudyPlan, dose_ids
from vlmerge.study.results import (
    MEAN,
    DoseResponse,
    GalleryEntry,
    Group,
    Mergeability,
    MergeabilityPoint,
    MetricName,
    ModelResult,
    PathPoint,
    StudyResults,
    SweepPoint,
    Sweeps,
    Timing,
)
from vlmerge.study.stages import CheckpointOutput, DistancesOutput, GalleryOutput
from vlmerge.study.stats import spearman_interval

Outputs = Mapping[str, StageOutput]


def model_result(model: PlannedModel, outputs: Outputs, observations: Observations) -> ModelResult:
    scores = {}
    for protocol in observations.tasks:
        by_task = {
            task: score
            for task in observations.protocol_tasks(protocol)
            if (score := observations.score(model.id, protocol, task)) is not None
        }
        if by_task:
            scores[protocol] = by_task
    first = model.runs[0].checkpoint
    checkpoints = {
        run.random_seed: Path("cache", run.checkpoint.name, run.checkpoint.output.name).as_posix() for run in model.runs
    }
    return ModelResult(
        model.id,
        model.label,
        model.kind,
        model.groups,
        model.seed_fraction,
        model.placement.value,
        model.merge.method if model.merge else None,
        dict(model.merge.options) if model.merge else {},
        checkpoints,
        outputs[first.key].result_as(CheckpointOutput).parameters,
        scores,
        model.merge.label if model.merge else None,
    )


def sweeps(models: Mapping[str, ModelResult]) -> Sweeps:
    def sweep(group: Group, x) -> tuple[SweepPoint, ...]:
        return tuple(
            sorted(
                (SweepPoint(x(m), m.id) for m in models.values() if group in m.groups),
                key=lambda p: (str(p.x), p.model),
            )
        )

    ratios = tuple(
        sorted(
            (
                SweepPoint(m.options.get("ratio", 0.5), m.id)
                for m in models.values()
                if m.method == "interpolation"
                and Group.METHODS in m.groups
                and isinstance(m.options.get("ratio", 0.5), int | float)  # a ratio by role or depth is no point
            ),
            key=lambda p: p.x,
        )
    )
    return Sweeps(
        seed_fraction=tuple(sorted(sweep(Group.SEED_LENGTH, lambda m: m.seed_fraction), key=lambda p: p.x)),
        architecture=sweep(Group.ARCHITECTURE, lambda m: m.placement),
        interpolation_ratio=ratios,
    )


def layer_groups(layers: Mapping[int, Mapping[str, float]]) -> dict[MetricName, float]:
    """Each distance averaged over the lower and the upper half of the layers."""
    order = sorted(layers)
    middle = len(order) // 2
    halves = [order[:middle], order[middle:]] if len(order) > 1 else []
    return {
        MetricName(family, (part[0], part[-1])): float(np.mean([layers[layer][family] for layer in part]))
        for part in halves
        for family in layers[order[0]]
    }


def mergeability(plan: StudyPlan, models: Mapping[str, ModelResult], outputs: Outputs) -> Mergeability:
    """One point per merge by the main method and seed: the experts' distances, and what the merge kept
    of the unmerged model's score (mean over tasks) under each protocol."""
    points = []
    for planned in plan.models.values():
        if planned.specific is None:
            continue
        merged, specific = models[planned.id], models[planned.specific]
        for run in planned.runs:
            retention = {}
            for protocol, by_task in merged.scores.items():
                task = HELDOUT_HEADLINE if protocol == HELDOUT else MEAN if MEAN in by_task else next(iter(by_task))
                theirs = specific.score(protocol, task)
                if theirs is not None and run.random_seed in theirs.per_seed:
                    kept = by_task[task].per_seed[run.random_seed] - theirs.per_seed[run.random_seed]
                    retention[protocol] = better(protocol) * kept  # a loss kept is a loss not risen
            if not retention:
                continue
            distances = outputs[run.mergeability.key].result_as(DistancesOutput)
            model_level = {MetricName(family): value for family, value in distances.model.items()}
            metrics = {**model_level, **layer_groups(distances.layers)}
            points.append(
                MergeabilityPoint(
                    planned.specific,
                    planned.id,
                    run.random_seed,
                    planned.seed_fraction,
                    planned.placement.value,
                    metrics,
                    retention,
                )
            )
    correlations = {}
    for protocol in plan.recipe.protocols:
        chosen = [p for p in points if protocol in p.retention]
        if chosen:
            correlations[protocol] = {
                metric: spearman_interval([p.metrics[metric] for p in chosen], [p.retention[protocol] for p in chosen])
                for metric in chosen[0].metrics
            }
    return Mergeability(tuple(points), correlations)


def path(plan: StudyPlan, observations: Observations) -> tuple[PathPoint, ...]:
    """The held-out loss along the path between the experts of each model whose path was scored."""
    points = []
    for model in plan.models.values():
        if not any(run.path is not None for run in model.runs):
            continue
        for ratio in plan.recipe.heldout.path_ratios:
            score = observations.score(model.id, path_protocol(ratio), HELDOUT_HEADLINE)
            if score is not None:
                points.append(PathPoint(model.id, ratio, score.estimate))
    return tuple(points)


def dose_response(plan: StudyPlan, observations: Observations) -> tuple[DoseResponse, ...]:
    """Per origin, what the main merge loses on held-out pairs (merged minus unmerged loss) at each length
    of the modality-specific stage, and Spearman's rho of length with that loss over (length, seed)."""
    lengths = sorted(set(plan.recipe.specific_steps))
    found = []
    for condition in DOSE_CONDITIONS:
        costs, points = [], []
        for steps in lengths:
            parent, merge = dose_ids(condition, steps)
            measured = observations.contrast({(merge, HELDOUT): 1.0, (parent, HELDOUT): -1.0}, HELDOUT_HEADLINE)
            if measured is None:
                break
            per_seed, cost = measured
            costs.append(cost)
            points += [(steps, value) for value in per_seed.values()]
        if costs and len(costs) == len(lengths):
            correlation = spearman_interval([x for x, _ in points], [y for _, y in points])
            found.append(DoseResponse(condition, tuple(lengths), tuple(costs), correlation))
    return tuple(found)


def gallery(plan: StudyPlan, outputs: Outputs) -> tuple[GalleryEntry, ...]:
    if plan.gallery is None:
        return ()
    entries = outputs[plan.gallery.key].result_as(GalleryOutput).entries
    where = Path("cache", plan.gallery.name)
    return tuple(replace(entry, image=(where / entry.image).as_posix()) for entry in entries)


def assemble(plan: StudyPlan, outputs: Outputs, seconds: float) -> tuple[StudyResults, Observations]:
    """Everything the report shows but the claims, and the observations the claims are judged on."""
    recipe = plan.recipe
    observations = Observations(plan, outputs)
    models = {model_id: model_result(model, outputs, observations) for model_id, model in plan.models.items()}
    ran = [output for output in outputs.values() if not output.cached]
    timing = Timing(
        round(seconds, 1),
        len(ran),
        len(outputs) - len(ran),
        round(sum(output.seconds for output in outputs.values()), 1),
    )
    results = StudyResults(
        recipe.name,
        recipe,
        tuple(recipe.tasks),
        observations.primary,
        tuple(recipe.protocols),
        models,
        sweeps=sweeps(models),
        mergeability=mergeability(plan, models, outputs),
        gallery=gallery(plan, outputs),
        timing=timing,
        path=path(plan, observations),
        dose=dose_response(plan, observations),
    )
    return replace(results, control=pretraining_gain(results, observations, recipe)), observations
