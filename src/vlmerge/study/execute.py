"""Runs a planned study's stages in order, each through the stage cache (its only caller).

Each stage kind is one entry of `WORK`: its settings type, its output type, and the function that turns
typed settings and its inputs' output files into the library call that produces it (a pre-training run,
a merge, a fine-tuning run, ...) and returns the typed output the assembler reads.
"""

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Generic, TypeVar

import torch
from tqdm import tqdm

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError, StudyError, VlmergeError
from vlmerge.data.sources import load_pairs
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging.engine import merge_checkpoint
from vlmerge.merging.request import MergeRequest
from vlmerge.metrics.mergeability import mergeability
from vlmerge.models.checkpoint import head_names
from vlmerge.study.cache import DONE, StageCache, StageOutput
from vlmerge.study.gallery import retrieval_gallery
from vlmerge.study.graph import MODEL_FILE, OUTPUT_FILES, Stage, StageKind
from vlmerge.study.plan import StudyPlan
from vlmerge.study.planner import MERGE_SELECTION
from vlmerge.study.stages import (
    CheckpointOutput,
    DistancesOutput,
    EvaluationOutput,
    FinetuneSettings,
    FisherSettings,
    GalleryOutput,
    GallerySettings,
    GramsSettings,
    HeldoutSettings,
    MergeabilitySettings,
    MergeOutput,
    MergeSettings,
    PathOutput,
    PathSettings,
    PretrainedSettings,
    TokenizerSettings,
    UntrainedSettings,
    Written,
    ZeroShotSettings,
    with_fields,
)
from vlmerge.tasks.finetune import evaluate_checkpoint, run_finetune
from vlmerge.tasks.heldout import checkpoint_heldout
from vlmerge.training.config import PretrainConfig, TokenizerConfig
from vlmerge.training.fisher import collect_checkpoint_fisher
from vlmerge.training.grams import collect_checkpoint_grams
from vlmerge.training.pretrain import run_pretraining, save_untrained
from vlmerge.training.pretrained_init import save_pretrained_seed
from vlmerge.training.run_directory import DirectoryLock
from vlmerge.training.setup import resolve_tokenizer
from vlmerge.tuning.adamerge import adamerge_checkpoint


@dataclass(frozen=True)
class Inputs:
    """The output files of a stage's input stages, by role, relative to the study's cache (None: no such input)."""

    model: Path | None = None  # the checkpoint (or run) a stage reads
    init: Path | None = None  # the checkpoint pre-training starts from
    tokenizer: Path | None = None  # the study's vocabulary, for a run from random weights
    source: Path | None = None  # the specific model a merge merges
    seed_checkpoint: Path | None = None  # the experts' origin, for methods that need it
    grams: Path | None = None
    fisher: Path | None = None
    specific: Path | None = None  # the unmerged model mergeability measures

    @classmethod
    def of(cls, stage: Stage) -> "Inputs":
        roles = {f.name for f in fields(cls)}
        if unknown := set(stage.inputs) - roles:
            raise StudyError(f"stage {stage.name}: inputs {sorted(unknown)} have no role here ({sorted(roles)})")
        return cls(**{role: Path(s.name) / s.output for role, s in stage.inputs.items()})


S = TypeVar("S", bound=StrictConfig)
O = TypeVar("O", bound=StrictConfig)


@dataclass(frozen=True)
class StageWork(Generic[S, O]):
    """What a stage kind is: the settings it is planned with, the output it records, and its work.

    mergekit's `Task` binds its arguments to the object that executes them; here the settings are data
    (hashed into the cache key, written to done.json, sent to worker processes and scheduler jobs) and
    the work is a plain function of (settings, inputs, directory, progress) looked up by kind, so a
    planned `Stage` stays a small picklable value and planning imports none of the training code."""

    settings: type[S]
    output: type[O]
    execute: Callable[[S, Inputs, Path, bool], O]


def _parameters(checkpoint: Path) -> CheckpointOutput:
    """The backbone's parameter count (heads apart, as `count_parameters` counts a loaded model), from
    the written file's header: shapes only, no tensor is read and no model built."""
    reader = open_checkpoint(checkpoint)
    heads = tuple(f"{name}." for name in head_names(reader))
    backbone = [key for key in reader.keys if not (heads and key.startswith(heads))]
    return CheckpointOutput(parameters=sum(reader.numel(key) for key in backbone))


def _tokenizer(settings: TokenizerSettings, inputs: Inputs, directory: Path, progress: bool) -> Written:
    captions = load_pairs(settings.data, "train", progress).captions
    resolve_tokenizer(settings.tokenizer, captions, None).save(directory / OUTPUT_FILES[StageKind.TOKENIZER])
    return Written()


def _pretrained(settings: PretrainedSettings, inputs: Inputs, directory: Path, progress: bool) -> CheckpointOutput:
    out = save_pretrained_seed(
        directory / MODEL_FILE,
        image_size=settings.image_size,
        max_text_len=settings.max_text_len,
        random_seed=settings.random_seed,
    )
    return _parameters(out)


def _pretrain(settings: PretrainConfig, inputs: Inputs, directory: Path, progress: bool) -> CheckpointOutput:
    """A run from a checkpoint starts from it and takes its tokenizer; one from random weights the study's."""
    changes: dict[str, object] = {}
    if inputs.init is not None:
        changes["init"] = str(inputs.init)
    if inputs.tokenizer is not None:
        changes["tokenizer"] = with_fields(TokenizerConfig, settings.tokenizer, path=str(inputs.tokenizer))
    return _parameters(run_pretraining(with_fields(PretrainConfig, settings, **changes), directory, progress))


def _untrained(settings: UntrainedSettings, inputs: Inputs, directory: Path, progress: bool) -> CheckpointOutput:
    return _parameters(save_untrained(settings.config(inputs.tokenizer), directory / MODEL_FILE))


def _grams(settings: GramsSettings, inputs: Inputs, directory: Path, progress: bool) -> Written:
    collect_checkpoint_grams(
        inputs.model,
        directory / OUTPUT_FILES[StageKind.GRAMS],
        settings.data,
        settings.split,
        settings.batch_size,
        progress=progress,
        sequential=settings.sequential,  # RegMean++'s pass: the lower layers merged as it goes
    )
    return Written()


def _fisher(settings: FisherSettings, inputs: Inputs, directory: Path, progress: bool) -> Written:
    collect_checkpoint_fisher(
        inputs.model,
        directory / OUTPUT_FILES[StageKind.FISHER],
        settings.data,
        settings.split,
        settings.batch_size,
        random_seed=settings.random_seed,
        progress=progress,
    )
    return Written()


def merge_request(inputs: Inputs) -> MergeRequest:
    """The files a merge stage reads, as the one request the engine takes; every merge of the study
    merges every expert, so the selection is the plan's, not a setting of the stage."""
    return MergeRequest.parse(
        {
            "source": inputs.source,
            "seed_checkpoint": inputs.seed_checkpoint,
            "grams": inputs.grams,
            "fisher": inputs.fisher,
            "selection": MERGE_SELECTION,
        },
        where="merge",
    )


def _merge(settings: MergeSettings, inputs: Inputs, directory: Path, progress: bool) -> MergeOutput:
    if settings.adamerge is not None:  # its state file in the stage directory: a killed stage resumes
        result = adamerge_checkpoint(
            inputs.source,
            seed_checkpoint=inputs.seed_checkpoint,
            out=directory / MODEL_FILE,
            config=settings.adamerge,
            data=settings.data,
            selection=MERGE_SELECTION.value,
            spec_out=directory / "lam.json",
            state=directory / "adamerge.pt",
            progress=progress,
        ).merge
    else:
        result = merge_checkpoint(merge_request(inputs), settings.method, settings.options, out=directory / MODEL_FILE)
    return MergeOutput(parameters=_parameters(result.path).parameters, warnings=tuple(result.warnings))


def _finetune(settings: FinetuneSettings, inputs: Inputs, directory: Path, progress: bool) -> EvaluationOutput:
    return EvaluationOutput.of(run_finetune(settings.config(inputs.model), directory, progress))


def _zero_shot(settings: ZeroShotSettings, inputs: Inputs, directory: Path, progress: bool) -> EvaluationOutput:
    return EvaluationOutput.of(evaluate_checkpoint(inputs.model, "retrieval", "test", settings.data))


def _heldout(settings: HeldoutSettings, inputs: Inputs, directory: Path, progress: bool) -> EvaluationOutput:
    evaluation = checkpoint_heldout(
        inputs.model, settings.data, settings.objectives, settings.split, settings.batch_size
    )
    return EvaluationOutput.of(evaluation)


PATH_METHOD = "interpolation"


def _path(settings: PathSettings, inputs: Inputs, directory: Path, progress: bool) -> PathOutput:
    """Each ratio's merge is written to the stage's directory, scored, and removed: only the objectives
    stay (the main merge, at its own ratio, is a stage of its own)."""
    points = {}
    for ratio in settings.ratios:
        merged = directory / f"ratio-{ratio:g}.safetensors"
        merge_checkpoint(merge_request(inputs), PATH_METHOD, {"ratio": ratio}, out=merged)
        try:
            evaluation = checkpoint_heldout(
                merged, settings.data, settings.objectives, settings.split, settings.batch_size
            )
        finally:
            merged.unlink(missing_ok=True)
        points[f"{ratio:g}"] = EvaluationOutput.of(evaluation)
    return PathOutput(points=points)


def _mergeability(settings: MergeabilitySettings, inputs: Inputs, directory: Path, progress: bool) -> DistancesOutput:
    report = mergeability(open_checkpoint(inputs.specific))
    return DistancesOutput(model=report.model, layers=report.per_layer)


def _gallery(settings: GallerySettings, inputs: Inputs, directory: Path, progress: bool) -> GalleryOutput:
    return GalleryOutput(entries=retrieval_gallery(inputs.model, settings.data, settings.size, directory))


WORK: dict[StageKind, StageWork] = {
    StageKind.TOKENIZER: StageWork(TokenizerSettings, Written, _tokenizer),
    StageKind.PRETRAINED: StageWork(PretrainedSettings, CheckpointOutput, _pretrained),
    StageKind.UNTRAINED: StageWork(UntrainedSettings, CheckpointOutput, _untrained),
    StageKind.SEED: StageWork(PretrainConfig, CheckpointOutput, _pretrain),
    StageKind.MULTIWAY: StageWork(PretrainConfig, CheckpointOutput, _pretrain),
    StageKind.GRAMS: StageWork(GramsSettings, Written, _grams),
    StageKind.FISHER: StageWork(FisherSettings, Written, _fisher),
    StageKind.MERGE: StageWork(MergeSettings, MergeOutput, _merge),
    StageKind.FINETUNE: StageWork(FinetuneSettings, EvaluationOutput, _finetune),
    StageKind.ZERO_SHOT: StageWork(ZeroShotSettings, EvaluationOutput, _zero_shot),
    StageKind.HELDOUT: StageWork(HeldoutSettings, EvaluationOutput, _heldout),
    StageKind.PATH: StageWork(PathSettings, PathOutput, _path),
    StageKind.MERGEABILITY: StageWork(MergeabilitySettings, DistancesOutput, _mergeability),
    StageKind.GALLERY: StageWork(GallerySettings, GalleryOutput, _gallery),
}


STAGE_THREADS = 1  # every stage computes on one intra-op thread, however the study runs


def run_stage(root: Path, stage: Stage, progress: bool) -> StageOutput:
    """One stage through the cache (in this process, or in a worker of a parallel run), on STAGE_THREADS
    threads: a different thread count sums in another order, and training amplifies the last bits (one
    fine-tuning run measured here moved from 0.618 to 0.500 accuracy), so the count is fixed to make a
    stage's output depend on its spec alone."""
    work = WORK[stage.kind]
    previous = torch.get_num_threads()
    torch.set_num_threads(STAGE_THREADS)
    try:
        return StageCache(root, progress).run(stage, work.output, lambda directory: _work(root, stage, work, progress))
    finally:
        torch.set_num_threads(previous)


def _work(root: Path, stage: Stage, work: StageWork, progress: bool) -> StrictConfig:
    """The stage's work, run inside the cache on paths relative to it: what a stage records of its inputs
    (a run's config, a merge's provenance) then names no study directory, so the same stage writes the
    same bytes wherever its study lives, and a recorded path resolves against the cache it sits in."""
    if not isinstance(stage.settings, work.settings):
        raise StudyError(f"stage {stage.name}: {type(stage.settings).__name__} settings, not {work.settings.__name__}")
    inputs = Inputs.of(stage)
    with contextlib.chdir(root):
        return work.execute(stage.settings, inputs, Path(stage.name), progress)


@dataclass(frozen=True)
class SubmititOptions:
    """Stages as jobs through submitit: SLURM where `sbatch` is found, else submitit's local executor."""

    folder: Path  # job scripts and logs (on a shared file system on a cluster, like the study directory)
    timeout_min: int = 60
    partition: str | None = None
    cluster: str | None = None  # None: submitit chooses; "local" or "debug" for a machine without SLURM


def execute(
    plan: StudyPlan,
    study_dir: str | os.PathLike,
    progress: bool = True,
    workers: int = 1,
    submitit: SubmititOptions | None = None,
) -> dict[str, StageOutput]:
    """Run (or take from the cache) every stage of the plan, inputs before readers; outputs by stage key.

    By default in order, in this process. `workers` > 1 runs up to that many independent stages side by
    side, each in its own process (every stage computes on one thread either way, so all modes give the
    same bytes; on small models two single-threaded stages side by side beat one after the other, see
    benchmarks/study_throughput.py); with `submitit`, each stage is a job of that scheduler instead. A
    stage that fails is named, and the next invocation runs it again: finished stages stay in the cache,
    which is content-addressed, so jobs on a shared directory need no other coordination. With `progress`,
    a bar counts the stages done out of all and estimates the time left.
    """
    root = Path(study_dir) / "cache"
    with _Progress(plan, root, progress) as bar:
        if submitit is not None:
            return _schedule(plan, root, bar, _SubmititJobs(submitit), max(workers, 1))
        if workers > 1:
            return _schedule(plan, root, bar, _ProcessJobs(workers), workers)
        outputs: dict[str, StageOutput] = {}
        for stage in plan.stages:
            outputs[stage.key] = _named_failure(stage, lambda s=stage: run_stage(root, s, progress))
            bar.done(stage)
        return outputs


def lock_study(study_dir: str | os.PathLike) -> DirectoryLock:
    """The study directory's lock (flock on STUDY/.lock, dropped when this process dies), to hold in a
    `with` block. Only another `vlmerge study` is refused: the stages run in worker processes or
    scheduler jobs lock their own run directories, never this one, so they are not blocked by it."""
    return DirectoryLock(Path(study_dir), "study")


PROGRESS_FORMAT = "[study] {n_fmt}/{total_fmt} stages |{bar:20}| {elapsed} elapsed, {remaining} left"


class _Progress:
    """Stages done out of the plan's and the time left, as one bar (tqdm, on stderr) that the stage lines
    print above. Stages already in the cache count as done from the start, so the time left is estimated
    from the stages that run (tqdm's rate over this run, unsmoothed)."""

    def __init__(self, plan: StudyPlan, root: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.pending = {stage.key for stage in plan.stages if not (root / stage.name / DONE).exists()}
        total = len(plan.stages)
        self.bar = tqdm(
            total=total,
            initial=total - len(self.pending),
            bar_format=PROGRESS_FORMAT,
            smoothing=0,
            disable=not enabled,
            file=sys.stderr,
        )

    def done(self, stage: Stage) -> None:
        if stage.key in self.pending:
            self.pending.remove(stage.key)
            self.bar.update()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()


def _named_failure(stage: Stage, run: Callable[[], StageOutput]) -> StageOutput:
    try:
        return run()
    except Exception as error:  # a job's failure arrives as whatever the stage raised
        what = str(error) if isinstance(error, VlmergeError) else f"{type(error).__name__}: {error}"
        raise StudyError(f"stage {stage.name} ({stage.kind.value} {stage.label}): {what}") from error


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal the kernel sends a process when its parent dies
PARENT_POLL_SECONDS = 1.0


def _die_with_parent(parent: int) -> None:
    """A worker's initializer: the worker ends when the study process does. A study that is SIGKILLed
    cannot shut its pool down, and its workers would finish their stages, then wait for work forever
    (and keep multiprocessing's resource tracker alive, which exits once the last of them is gone)."""
    if not _kernel_kills_on_parent_death():
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()
    if os.getppid() != parent:  # it died before anyone watched
        os._exit(1)


def _kernel_kills_on_parent_death() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Elsewhere: poll the parent's pid (an orphan is adopted by another process) and exit once it changes."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


class _ProcessJobs:
    """Stages in a pool of fresh processes on this machine, each of which dies with this one."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")  # no forked copy of this process's torch threads
        self.pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
        )

    def submit(self, root: Path, stage: Stage) -> Future:
        # Parallel stages print their start and end; their progress bars would overwrite each other.
        return self.pool.submit(run_stage, root, stage, False)

    def finished(self, jobs: list[Future]) -> list[Future]:
        return list(wait(jobs, return_when=FIRST_COMPLETED).done)

    def close(self, cancel: bool) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)


class _SubmititJobs:
    """Stages as jobs of an existing scheduler (submitit: SLURM on a cluster, or its local executor)."""

    POLL_SECONDS = 1.0

    def __init__(self, options: SubmititOptions) -> None:
        try:
            import submitit
        except ImportError:
            raise ConfigError("--submitit needs the submitit package: pip install submitit") from None
        self.executor = submitit.AutoExecutor(folder=options.folder, cluster=options.cluster)
        parameters = {"timeout_min": options.timeout_min, "name": "vlmerge-stage"}
        if options.partition:
            parameters["slurm_partition"] = options.partition
        self.executor.update_parameters(**parameters)

    def submit(self, root: Path, stage: Stage):
        return self.executor.submit(run_stage, root.resolve(), stage, False)

    def finished(self, jobs: list) -> list:
        while not (done := [job for job in jobs if job.done()]):
            time.sleep(self.POLL_SECONDS)
        return done

    def close(self, cancel: bool) -> None:
        """Jobs already submitted finish on their own (the scheduler owns them); nothing is cancelled."""


def _schedule(plan: StudyPlan, root: Path, bar: _Progress, jobs, limit: int) -> dict[str, StageOutput]:
    """Submit every stage whose inputs are done (at most `limit` at a time), collect them as they finish."""
    outputs: dict[str, StageOutput] = {}
    waiting = list(plan.stages)
    running: dict = {}
    cache = StageCache(root, bar.enabled)
    failed = True
    try:
        while waiting or running:
            for stage in [s for s in waiting if all(i.key in outputs for i in s.inputs.values())]:
                if (cached := cache.cached(stage, WORK[stage.kind].output)) is not None:
                    waiting.remove(stage)
                    outputs[stage.key] = cached
                    bar.done(stage)
                elif len(running) < limit:
                    waiting.remove(stage)
                    cache.say(f"{stage.kind.value:<10} {stage.label} ...")
                    running[jobs.submit(root, stage)] = stage
            if not running:
                continue
            for job in jobs.finished(list(running)):
                stage = running.pop(job)
                outputs[stage.key] = _named_failure(stage, job.result)
                cache.say(f"{stage.kind.value:<10} {stage.label} done in {outputs[stage.key].seconds:.1f} s")
                bar.done(stage)
        failed = False
    finally:
        jobs.close(cancel=failed)
    return outputs
