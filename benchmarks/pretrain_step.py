"""Cost of micro pre-training steps as a study stage runs them, against a plain PyTorch loop.

Usage: python benchmarks/pretrain_step.py [--steps 100] [--repeats 3] [--kind specific|seed] [--threads 1]

- ours: `run_pretraining` (what a study's seed or specific stage calls) on the config the study
  planner builds from recipes/emoji-demo.yaml, in a fresh run directory: data, tokenizer, model,
  optimiser, the trainer's steps, checkpoints, metrics and the final model file;
- anchor: the same model, heads and initial weights in a plain loop: forward, the same objectives
  written out with torch.nn.functional, backward, AdamW (torch's defaults), on the same batches
  tensorised and masked in memory beforehand.

Both run in this process, interleaved, on the study's one intra-op thread; each figure is the median
of --repeats timed runs after one untimed warm-up. Then one instrumented run of ours splits its time
into pieces (manual timers around the functions it calls), and a fresh process runs a stage of one
step end to end, to show what a stage costs before its first step. Time nothing else meanwhile.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "emoji-demo.yaml"


def stage_config(kind: str, steps: int, tokenizer: Path | None):
    """The pre-training config the study builds for this stage, its tokenizer as the study's
    tokenizer stage leaves it (random init: the specific stage is naive merging's)."""
    from vlmerge.models.config import ExpertPlacement
    from vlmerge.study.graph import StageKind
    from vlmerge.study.planner import StagePlanner
    from vlmerge.study.recipe import StudyRecipe
    from vlmerge.training.config import PretrainConfig

    planner = StagePlanner(StudyRecipe.parse(yaml.safe_load(RECIPE.read_text())))
    if kind == "seed":
        config = planner.pretrain_config(StageKind.SEED, 0, steps, None)
    else:
        config = planner.pretrain_config(StageKind.MULTIWAY, 0, steps, ExpertPlacement.ALL)
    fields = config.model_dump()
    fields["tokenizer"] = {**fields["tokenizer"], "path": str(tokenizer) if tokenizer else None}
    return PretrainConfig.parse(fields)


def study_tokenizer(config, directory: Path) -> Path:
    from vlmerge.data.sources import load_pairs
    from vlmerge.training.setup import resolve_tokenizer

    path = directory / "tokenizer.json"
    resolve_tokenizer(config.tokenizer, load_pairs(config.data, "train").captions, None).save(path)
    return path


class Timers:
    """Seconds per named piece, summed over calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


MISSING = object()


def patch(owner: object, attribute: str, replacement: Callable, undo: list) -> None:
    undo.append((owner, attribute, vars(owner).get(attribute, MISSING)))
    setattr(owner, attribute, replacement)


def instrumented(timers: Timers) -> list:
    """Wrap what a stage calls in timers; returns what to restore."""
    import vlmerge.training.objectives as objectives
    import vlmerge.training.pretrain as pretrain
    from vlmerge.models.transformer import VLTransformer
    from vlmerge.training.trainer import Trainer

    undo: list = []
    for name, module, attribute in [
        ("setup: load pairs", pretrain, "load_pairs"),
        ("setup: open run dir", pretrain, "open_run_dir"),
        ("setup: tokenizer", pretrain, "run_tokenizer"),
        ("setup: build model", pretrain, "build_pretraining_model"),
        ("setup: final model file", pretrain, "save_model"),
        ("step: batch order", pretrain, "batch_indices"),
        ("step: generator", pretrain, "step_generator"),
        ("step: masking", objectives, "whole_word_mask"),
    ]:
        patch(module, attribute, timers.wrap(name, getattr(module, attribute)), undo)
    patch(
        pretrain.PairData,
        "of",
        classmethod(timers.wrap("setup: tokenise captions", pretrain.PairData.of.__func__)),
        undo,
    )
    patch(
        pretrain.PairData,
        "__getitem__",
        timers.wrap("step: data (gather, images)", pretrain.PairData.__getitem__),
        undo,
    )
    patch(VLTransformer, "forward", timers.wrap("step: model forward", VLTransformer.forward), undo)
    patch(
        objectives.PretrainingObjective,
        "forward",
        timers.wrap("objective", objectives.PretrainingObjective.forward),
        undo,
    )
    patch(torch.Tensor, "backward", timers.wrap("step: backward", torch.Tensor.backward), undo)
    patch(torch.nn.utils, "clip_grad_norm_", timers.wrap("step: grad clip", torch.nn.utils.clip_grad_norm_), undo)
    patch(Trainer, "fit", timers.wrap("fit", Trainer.fit), undo)
    patch(Trainer, "resume", timers.wrap("setup: resume check", Trainer.resume), undo)
    patch(Trainer, "save", timers.wrap("step: checkpoint writes", Trainer.save), undo)
    patch(Trainer, "_append_metrics", timers.wrap("step: metrics line", Trainer._append_metrics), undo)
    patch(pretrain, "make_optimizer", timers.wrap("setup: optimizer", pretrain.make_optimizer), undo)
    patch(torch.optim.AdamW, "step", timers.wrap("step: optimizer step", torch.optim.AdamW.step), undo)
    patch(torch.optim.Optimizer, "zero_grad", timers.wrap("step: zero grad", torch.optim.Optimizer.zero_grad), undo)
    scheduler = torch.optim.lr_scheduler.LRScheduler
    patch(scheduler, "step", timers.wrap("step: lr schedule", scheduler.step), undo)
    return undo


def stage_run(config, root: Path) -> Callable[[], float]:
    """ours: the stage's entry point in a new run directory; returns the seconds its steps took (fit)."""
    from vlmerge.training.pretrain import run_pretraining
    from vlmerge.training.trainer import Trainer

    counter = iter(range(10**6))
    fit = Trainer.fit

    def run() -> float:
        spent = []

        def timed_fit(self, step_fn):
            start = time.perf_counter()
            try:
                return fit(self, step_fn)
            finally:
                spent.append(time.perf_counter() - start)

        Trainer.fit = timed_fit
        try:
            run_pretraining(config, root / f"run-{next(counter)}", progress=False)
        finally:
            Trainer.fit = fit
        return spent[0]

    return run


def anchor_run(config, seconds: dict[str, float] | None = None) -> Callable[[], float]:
    """The plain loop, on batches built beforehand from the same rows the stage reads."""
    from vlmerge.data.masking import whole_word_mask
    from vlmerge.data.sources import load_pairs
    from vlmerge.data.tokenizer import TextTokenizer
    from vlmerge.training.pretrain import build_pretraining_model
    from vlmerge.training.setup import PairData
    from vlmerge.training.trainer import batch_indices, step_generator

    tokenizer = TextTokenizer.load(config.tokenizer.path, config.tokenizer.max_len)
    pairs = PairData.of(load_pairs(config.data, "train"), tokenizer)
    batch_size, seed, weights = config.optimizer.batch_size, config.random_seed, config.objectives
    batches = []
    for step in range(config.steps):
        batch = pairs[batch_indices(len(pairs), batch_size, step, seed)]
        generator = step_generator(seed, step)
        masked, labels = whole_word_mask(
            batch.text, weights.mask_probability, tokenizer.mask_id, tokenizer.vocab_size, generator
        )
        batches.append((batch.images, batch.text.ids, batch.text.mask, masked, labels, generator))

    def run() -> float:
        model, heads = build_pretraining_model(config, tokenizer.vocab_size, tokenizer.max_len)
        model.train(), heads.train()
        optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=config.optimizer.lr)
        start = time.perf_counter()
        for images, ids, mask, masked, labels, generator in batches:
            t0 = time.perf_counter()
            losses = plain_losses(model, heads, images, ids, mask, masked, labels, generator)
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sum(losses).backward()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            if seconds is not None:
                seconds["forward + losses"] += t1 - t0
                seconds["backward"] += t2 - t1
                seconds["optimizer step"] += t3 - t2
        return time.perf_counter() - start

    return run


def plain_losses(model, heads, images, ids, mask, masked, labels, generator) -> list[torch.Tensor]:
    """ITC, ITC through the vl experts, ITM with hard negatives, MLM: the stage's objectives, plainly."""

    def itc(image_cls, text_cls, scale):
        logits = scale.exp().clamp(max=100.0) * F.normalize(image_cls, dim=-1) @ F.normalize(text_cls, dim=-1).T
        targets = torch.arange(len(logits))
        return logits, (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    logits, itc_loss = itc(
        heads.itc_image(model(images=images).cls),
        heads.itc_text(model(text_ids=ids, text_mask=mask).cls),
        heads.logit_scale,
    )
    _, itc_vl_loss = itc(
        heads.itc_vl_image(model(images=images, unimodal_through_vl=True).cls),
        heads.itc_vl_text(model(text_ids=ids, text_mask=mask, unimodal_through_vl=True).cls),
        heads.vl_logit_scale,
    )
    eye = torch.eye(len(logits), dtype=torch.bool)
    with torch.no_grad():
        text_for_image = torch.multinomial(logits.softmax(1).masked_fill(eye, 0) + 1e-12, 1, generator=generator)[:, 0]
        image_for_text = torch.multinomial(logits.T.softmax(1).masked_fill(eye, 0) + 1e-12, 1, generator=generator)[
            :, 0
        ]
    fused = model(
        images=torch.cat([images, images, images[image_for_text]]),
        text_ids=torch.cat([ids, ids[text_for_image], ids]),
        text_mask=torch.cat([mask, mask[text_for_image], mask]),
    )
    itm_labels = torch.cat([torch.ones(len(images)), torch.zeros(2 * len(images))]).long()
    itm_loss = F.cross_entropy(heads.itm(model.pool(fused)), itm_labels)
    fused = model(images=images, text_ids=masked, text_mask=mask)
    mlm_logits = heads.mlm(fused.hidden[:, : fused.num_text_tokens])
    mlm_loss = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return [itc_loss, itc_vl_loss, itm_loss, mlm_loss]


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per run: total seconds and the steps' seconds each repeat; one warm-up each, then in turn."""
    samples: dict[str, dict[str, list[float]]] = {name: {"total": [], "steps": []} for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            steps = run()
            total = time.perf_counter() - start
            if repeat:
                samples[name]["total"].append(total)
                samples[name]["steps"].append(steps)
    return samples


def breakdown(config, root: Path) -> tuple[dict[str, float], dict[str, int]]:
    timers = Timers()
    undo = instrumented(timers)
    try:
        stage_run(config, root)()
    finally:
        restore_all(undo)
    return dict(timers.seconds), dict(timers.calls)


def restore_all(undo: list) -> None:
    for owner, attribute, original in reversed(undo):
        if original is MISSING:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, original)


def print_breakdown(seconds: dict[str, float], calls: dict[str, int], steps: int, anchor: dict[str, float]) -> None:
    fit, objective, forward = seconds.pop("fit"), seconds.pop("objective"), seconds["step: model forward"]
    masking = seconds.get("step: masking", 0.0)
    seconds["step: losses, heads, negatives (objective less forward, masking)"] = objective - forward - masking
    per_step = {k: v for k, v in seconds.items() if k.startswith("step:")}
    seconds["step: loop, logging, rest of fit"] = fit - sum(per_step.values()) - seconds.get("setup: resume check", 0)
    total = seconds.pop("total")
    seconds["setup: rest (config, lock, manifest, trainer)"] = total - sum(seconds.values())
    print(f"\nwhere one stage's {total:.2f} s go ({steps} steps; ms per step for per-step pieces)")
    for name, spent in sorted(seconds.items(), key=lambda item: (not item[0].startswith("setup"), -item[1])):
        per = f"{1e3 * spent / steps:8.2f} ms/step" if name.startswith("step") else " " * 16
        print(f"  {name:<66} {spent:7.3f} s {spent / total:6.1%} {per}  ({calls.get(name, '')} calls)")
    print(f"anchor pieces ({steps} steps)")
    for name, spent in anchor.items():
        print(f"  {name:<66} {spent:7.3f} s          {1e3 * spent / steps:8.2f} ms/step")


def startup_child(kind: str, tokenizer: str) -> None:
    """A stage of one step in this fresh process; prints the seconds of each phase as JSON."""
    marks = {"interpreter + torch": time.perf_counter() - START}
    t = time.perf_counter()
    from vlmerge.training.pretrain import run_pretraining

    marks["import vlmerge.training.pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    config = stage_config(kind, 1, Path(tokenizer))
    marks["study config (imports vlmerge.study)"] = time.perf_counter() - t
    timers = Timers()
    undo = instrumented(timers)
    with tempfile.TemporaryDirectory() as directory:
        t = time.perf_counter()
        run_pretraining(config, Path(directory) / "run", progress=False)
        marks["run_pretraining, 1 step"] = time.perf_counter() - t
        restore_all(undo)
        t = time.perf_counter()
        run_pretraining(config, Path(directory) / "again", progress=False)
        marks["the same stage again, warm process"] = time.perf_counter() - t
    print(json.dumps({"marks": marks, "pieces": timers.seconds}))


def startup(kind: str, tokenizer: Path, threads: int) -> None:
    command = [sys.executable, __file__, "--startup-child", kind, str(tokenizer), "--threads", str(threads)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the stage in a fresh process failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nstage of 1 step in a fresh process: {wall:.2f} s wall (process start to exit)")
    for name, spent in result["marks"].items():
        print(f"  {name:<44} {spent:7.3f} s")
    print("  inside the first run_pretraining:")
    for name, spent in sorted(result["pieces"].items(), key=lambda item: -item[1]):
        if name != "objective":
            print(f"    {name:<42} {spent:7.3f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kind", default="specific", choices=["specific", "seed"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (a study stage runs on 1)")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--startup-child", nargs=2, metavar=("KIND", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.startup_child:
        startup_child(*args.startup_child)
        return
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        tokenizer = study_tokenizer(stage_config(args.kind, args.steps, None), root)
        config = stage_config(args.kind, args.steps, tokenizer)
        print(
            f"{args.kind} stage of recipes/emoji-demo.yaml: model {config.model.size}, {config.data.image_size}px, "
            f"batch {config.optimizer.batch_size}, {args.steps} steps (checkpoint every {config.checkpoint_every}), "
            f"objectives {config.objectives.model_dump()}; {args.threads} thread(s); "
            f"median of {args.repeats} after 1 warm-up, interleaved"
        )
        samples = interleaved({"ours": stage_run(config, root), "anchor": anchor_run(config)}, args.repeats)
        ours, anchor = samples["ours"], samples["anchor"]
        medians = {name: {k: statistics.median(v) for k, v in run.items()} for name, run in samples.items()}
        ratios_total = [o / a for o, a in zip(ours["total"], anchor["steps"])]
        ratios_steps = [o / a for o, a in zip(ours["steps"], anchor["steps"])]
        print(
            f"  anchor (plain loop)          {medians['anchor']['steps']:7.2f} s  "
            f"{1e3 * medians['anchor']['steps'] / args.steps:7.1f} ms/step"
        )
        print(
            f"  ours, the trainer's steps    {medians['ours']['steps']:7.2f} s  "
            f"{1e3 * medians['ours']['steps'] / args.steps:7.1f} ms/step  "
            f"{statistics.median(ratios_steps):5.2f}x anchor (per repeat: {', '.join(f'{r:.2f}' for r in ratios_steps)})"
        )
        print(
            f"  ours, the whole stage        {medians['ours']['total']:7.2f} s  "
            f"{1e3 * medians['ours']['total'] / args.steps:7.1f} ms/step  "
            f"{statistics.median(ratios_total):5.2f}x anchor (per repeat: {', '.join(f'{r:.2f}' for r in ratios_total)})"
        )
        anchor_pieces: dict[str, float] = defaultdict(float)
        anchor_run(config, anchor_pieces)()
        start = time.perf_counter()
        seconds, calls = breakdown(config, root / "instrumented")
        seconds["total"] = time.perf_counter() - start
        print_breakdown(seconds, calls, args.steps, anchor_pieces)
        if not args.skip_startup:
            startup(args.kind, tokenizer, args.threads)


if __name__ == "__main__":
    main()
