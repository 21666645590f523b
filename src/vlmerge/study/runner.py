"""A study from its recipe: plan the stages, execute them (cached), assemble the typed results, judge
the paper's claims, write results.json and the report."""

import dataclasses
import json
import os
import time
from pathlib import Path

from vlmerge.io.atomic import atomic_path
from vlmerge.study.assemble import assemble
from vlmerge.study.claims import evaluate_claims, method_differences
from vlmerge.study.execute import SubmititOptions, execute, lock_study
from vlmerge.study.plan import plan_study
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.results import StudyResults

RESULTS = "results.json"


def run_study(
    recipe: StudyRecipe,
    study_dir: str | os.PathLike,
    progress: bool = True,
    report: bool = True,
    workers: int = 1,
    submitit: SubmititOptions | None = None,
) -> StudyResults:
    """Run (or complete) the study and write results.json and, by default, the report; `workers` and
    `submitit` choose how its stages run (see `execute`). The study directory is locked for the run: a
    second run on it is refused with one line (the stages this run starts elsewhere take no such lock)."""
    start = time.perf_counter()
    study_dir = Path(study_dir)
    plan = plan_study(recipe)
    with lock_study(study_dir):
        outputs = execute(plan, study_dir, progress, workers, submitit)
        results, observations = assemble(plan, outputs, time.perf_counter() - start)
        results = dataclasses.replace(
            results,
            claims=evaluate_claims(results, observations, recipe),
            methods=method_differences(results, observations, recipe),
        )
        with atomic_path(study_dir / RESULTS) as tmp:
            tmp.write_text(json.dumps(results.to_json(), indent=1))
        if report:
            from vlmerge.study.report import write_report

            write_report(study_dir, results)
    return results


def load_results(study_dir: str | os.PathLike) -> StudyResults:
    return StudyResults.from_json(json.loads((Path(study_dir) / RESULTS).read_text()))
