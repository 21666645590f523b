"""The typed study results from a plan and its stages' outputs: pure bookkeeping, nothing is run or read."""

from collections.abc import Mapping
from pathlib import Path

from vlmerge.study.cache import StageOutput
from vlmerge.study.plan import PlannedModel, StudyPlan
from vlmerge.study.results import (
    GalleryEntry,
    Group,
    Mergeability,
    MergeabilityPoint,
    ModelResult,
    StudyResults,
    SweepPoint,
    Sweeps,
    Timing,
)
from vlmerge.study.stats import spearman
from vlmerge.tasks import TASKS

Outputs = Mapping[str, StageOutput]


def primary_metrics(tasks: tuple[str, ...]) -> dict[str, str]:
    return {task: TASKS.get(task).primary_metric for task in tasks}


def model_result(model: PlannedModel, outputs: Outputs, primary: Mapping[str, str]) -> ModelResult:
    tasks = {task: outputs[stage.key].result["metrics"] for task, stage in model.finetunes.items()}
    score = sum(tasks[task][primary[task]] for task in tasks) / len(tasks)
    checkpoint = outputs[model.checkpoint.key].directory / model.checkpoint.output
    return ModelResult(
        model.id,
        model.label,
        model.kind,
        model.groups,
        model.seed_fraction,
        model.placement.value,
        model.merge.method if model.merge else None,
        dict(model.merge.options) if model.merge else {},
        Path("cache", model.checkpoint.name, checkpoint.name).as_posix(),
        outputs[model.checkpoint.key].result["parameters"],
        outputs[model.zero_shot.key].result["metrics"],
        tasks,
        score,
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
                if m.method == "interpolation" and Group.METHODS in m.groups
            ),
            key=lambda p: p.x,
        )
    )
    return Sweeps(
        seed_fraction=tuple(sorted(sweep(Group.SEED_LENGTH, lambda m: m.seed_fraction), key=lambda p: p.x)),
        architecture=sweep(Group.ARCHITECTURE, lambda m: m.placement),
        interpolation_ratio=ratios,
    )


def mergeability(plan: StudyPlan, models: Mapping[str, ModelResult], outputs: Outputs) -> Mergeability:
    """One point per modality-specific model merged by the main method: its distances, its merge's score."""
    points = tuple(
        MergeabilityPoint(
            planned.mergeability.inputs["specific"].name,
            model_id,
            planned.seed_fraction,
            planned.placement.value,
            outputs[planned.mergeability.key].result["model"],
            models[model_id].score,
        )
        for model_id, planned in plan.models.items()
        if planned.mergeability is not None
    )
    names = sorted(points[0].metrics) if points else []
    return Mergeability(
        points, {name: spearman([p.metrics[name] for p in points], [p.score for p in points]) for name in names}
    )


def gallery(plan: StudyPlan, outputs: Outputs) -> tuple[GalleryEntry, ...]:
    if plan.gallery is None:
        return ()
    entries = outputs[plan.gallery.key].result["entries"]
    where = Path("cache", plan.gallery.name)
    return tuple(GalleryEntry.from_json({**entry, "image": (where / entry["image"]).as_posix()}) for entry in entries)


def assemble(plan: StudyPlan, outputs: Outputs, seconds: float) -> StudyResults:
    """Everything the report shows but the claims, which read these results (see claims.evaluate_claims)."""
    recipe = plan.recipe
    tasks = tuple(recipe.tasks)
    primary = primary_metrics(tasks)
    models = {model_id: model_result(model, outputs, primary) for model_id, model in plan.models.items()}
    ran = [output for output in outputs.values() if not output.cached]
    timing = Timing(
        round(seconds, 1),
        len(ran),
        len(outputs) - len(ran),
        round(sum(output.seconds for output in outputs.values()), 1),
    )
    return StudyResults(
        recipe.name,
        recipe.model_dump(mode="json"),
        tasks,
        primary,
        models,
        sweeps(models),
        mergeability(plan, models, outputs),
        gallery(plan, outputs),
        timing,
    )
