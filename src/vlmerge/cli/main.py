"""`vlmerge train | evaluate | grams | fisher | merge | tune | adamerge | metrics | inspect | study |
import-vit | export-hf`: each maps arguments onto the library (the parser is `vlmerge.cli.parser`).

Training and Gram collection run under torchrun unchanged:
`torchrun --nproc-per-node 2 -m vlmerge train seed --config seed.yaml --run-dir runs/seed`.
"""

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vlmerge.cli.options import options_from_text, request_from_args
from vlmerge.cli.parser import build_parser
from vlmerge.core.errors import ConfigError, VlmergeError
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging import MergeRequest, MergeWarning, merge_checkpoint
from vlmerge.training.distributed import PeerFailure

if TYPE_CHECKING:  # the study is imported when its command runs
    from vlmerge.study.results import Timing


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except VlmergeError as error:  # a registered method that the command line cannot express
        print(f"vlmerge: error: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MergeWarning)  # merges report their warnings themselves
            return COMMANDS[args.command](args)
    except PeerFailure:  # another process of the torchrun job failed and printed why
        return 2
    except VlmergeError as error:
        print(f"vlmerge {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or an unreadable path anywhere below: its message names the file
        print(f"vlmerge {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def run_merge(args: argparse.Namespace) -> int:
    options = options_from_text(args.method, args.options or {})
    result = merge_checkpoint(
        request_from_args(args, "merge"), args.method, options, out=args.out, progress=not args.quiet
    )
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    prepared = f" {result.prepared.model_dump_json()}" if result.prepared is not None else ""
    print(
        f"merged {len(result.plan.groups)} tensors with {result.method} {json.dumps(result.options)}{prepared} "
        f"(selection: {result.plan.selection.value}) -> {result.path}"
    )
    print(f"parameters: {result.source_parameters:,} -> {result.merged_parameters:,} ({result.parameter_ratio:.1%})")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from vlmerge.tasks import TASKS
    from vlmerge.training.setup import resolve_data
    from vlmerge.tuning import TuneObjective, tune_checkpoint

    objective = TuneObjective.parse(
        {
            "kind": args.objective,
            "task": args.task or "retrieval",
            "probe_steps": args.probe_steps,
            "probe_batch_size": args.probe_batch_size,
            "probe_lr": args.probe_lr,
            "random_seed": args.probe_seed,
        },
        where="tune objective",
    )
    metric = TASKS.get(objective.task).primary_metric

    def show(index: int, total: int, candidate) -> None:
        point = " ".join(f"{name}={value}" for name, value in candidate.searched.items())
        print(f"[{index + 1}/{total}] {point}: {metric} {candidate.score:.4f}", file=sys.stderr)

    result = tune_checkpoint(
        request_from_args(args, "tune"),
        args.method,
        args.grid,
        options_from_text(args.method, args.options or {}),
        out=args.out,
        objective=objective,
        data=resolve_data(args.data, args.source, args.limit),
        data_file=args.data,
        progress=not args.quiet and not args.json,
        on_candidate=None if args.quiet else show,
    )
    for note in result.merge.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.table.as_dict(), indent=2))
        return 0
    table = result.table
    print(
        f"best of {len(table.candidates)}: {json.dumps(result.best.searched)} "
        f"({table.metric} {result.best.score:.4f} on {table.split}) -> {result.merge.path}"
    )
    return 0


def run_adamerge(args: argparse.Namespace) -> int:
    from vlmerge.training.setup import resolve_data
    from vlmerge.tuning.adamerge import AdaMergeConfig, adamerge_checkpoint

    config = AdaMergeConfig.parse({name: getattr(args, name) for name in AdaMergeConfig.model_fields}, where="settings")
    result = adamerge_checkpoint(
        args.source,
        seed_checkpoint=args.seed_checkpoint,
        out=args.out,
        config=config,
        data=resolve_data(args.data, args.source, args.limit),
        selection=args.selection,
        spec_out=args.spec_out,
        state=args.state,
        data_file=args.data,
        progress=not args.quiet,
    )
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    print(
        f"{config.objective} on {config.split}: {result.objective_start:.4f} at lam {config.init_lam} -> "
        f"{result.objective_end:.4f} learnt ({len(result.losses)} steps{resumed}) -> {result.merge.path}"
    )
    print(f'lam spec -> {result.spec_path} (vlmerge merge --method arithmetic --lam "$(cat {result.spec_path})")')
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    from vlmerge.metrics import mergeability

    reference = open_checkpoint(args.reference) if args.reference else None
    report = mergeability(open_checkpoint(args.source), reference=reference, selection=args.selection, top_k=args.top_k)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format_table(args.per_tensor))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from vlmerge.merging.inspection import describe_plan, format_summary, summarize

    request = MergeRequest(source=args.checkpoint, input_layout=args.input_layout, selection=args.plan or "all")
    reader = open_checkpoint(request.source, request.input_layout)
    summary = summarize(reader)
    print(json.dumps(summary.as_dict(), indent=2, default=str) if args.json else format_summary(summary))
    if args.method:
        options = options_from_text(args.method, args.options or {})
        print(describe_plan(reader, request, args.method, options))
    elif args.options:
        raise ConfigError("merge options need --method: whose options they are")
    elif args.plan:
        print(describe_plan(reader, request))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from vlmerge.tasks.finetune import run_finetune
    from vlmerge.training.config import load_stage_config
    from vlmerge.training.pretrain import run_pretraining

    config = load_stage_config(args.stage, args.config)
    if args.stage == "finetune":
        metrics = run_finetune(config, args.run_dir, progress=not args.quiet).metrics
        print(format_metrics(f"{config.task} ({config.eval_split})", metrics), end="")
    else:
        print(f"{args.stage} model -> {run_pretraining(config, args.run_dir, progress=not args.quiet)}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from vlmerge.tasks.finetune import evaluate_path, run_checkpoint

    metrics = evaluate_path(args.checkpoint, args.task, args.split, args.data, args.limit).metrics
    title = f"{run_checkpoint(args.checkpoint)} ({args.split})"
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(title, metrics), end="")
    return 0


def run_grams(args: argparse.Namespace) -> int:
    from vlmerge.merging.regmean_pp import SequentialOptions
    from vlmerge.training.grams import collect_checkpoint_grams
    from vlmerge.training.setup import resolve_data

    given = {name: value for name, value in (("alpha", args.alpha), ("selection", args.selection)) if value is not None}
    if given and not args.sequential:
        flags = " and ".join(f"--{name}" for name in given)
        raise ConfigError(f"{flags} set the merge of a sequential (RegMean++) pass; add --sequential")
    sequential = SequentialOptions.parse(given, where="grams --sequential") if args.sequential else None
    data = resolve_data(args.data, args.checkpoint, args.limit)
    out = collect_checkpoint_grams(
        args.checkpoint,
        args.out,
        data,
        args.split,
        args.batch_size,
        args.normalize,
        progress=not args.quiet,
        sequential=sequential,
        data_file=args.data,
    )
    print(f"{'sequential ' if sequential else ''}gram matrices -> {out}")
    return 0


def run_fisher(args: argparse.Namespace) -> int:
    from vlmerge.training.fisher import collect_checkpoint_fisher
    from vlmerge.training.setup import resolve_data

    data = resolve_data(args.data, args.checkpoint, args.limit)
    out = collect_checkpoint_fisher(
        args.checkpoint,
        args.out,
        data,
        args.split,
        args.batch_size,
        args.random_seed,
        progress=not args.quiet,
        data_file=args.data,
    )
    print(f"fisher statistics -> {out}")
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    from vlmerge.study.execute import SubmititOptions
    from vlmerge.study.plan import describe_plan, plan_study
    from vlmerge.study.recipe import load_recipe
    from vlmerge.study.runner import run_study

    recipe = load_recipe(args.recipe)
    if args.dry_run:
        print(describe_plan(plan_study(recipe)))
        return 0
    out = Path(args.out or Path("studies") / recipe.name)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    submitit = None
    if args.submitit:
        submitit = SubmititOptions(Path(args.submitit), args.timeout_min, args.slurm_partition)
    first = run_study(recipe, out, progress=not args.quiet, workers=args.workers, submitit=submitit)
    _study_line(recipe.name, first.timing, out)
    if args.replicate:
        from vlmerge.study.replication import REPLICATE_DIR, replicate_recipe, write_replication

        second_recipe = replicate_recipe(recipe)
        second_dir = out / REPLICATE_DIR
        print(f"study {recipe.name}: replicating on random seeds {second_recipe.random_seeds} -> {second_dir}")
        second = run_study(second_recipe, second_dir, not args.quiet, workers=args.workers, submitit=submitit)
        _study_line(f"{recipe.name} (replicate)", second.timing, second_dir)
        print(f"replication -> {write_replication(out, first, second)['markdown']}")
    return 0


def _study_line(name: str, timing: "Timing", out: Path) -> None:
    print(
        f"study {name}: {timing.stages}/{timing.stages} stages done ({timing.stages_run} run, "
        f"{timing.stages_cached} reused) in {timing.seconds:.0f} s -> {out / 'report.md'}, {out / 'report.html'}"
    )


def format_metrics(title: str, metrics: dict[str, float]) -> str:
    return f"{title}\n" + "".join(f"  {name:<20}{value:>10.4f}\n" for name, value in metrics.items())


def run_import_vit(args: argparse.Namespace) -> int:
    from vlmerge.training.pretrained_init import save_pretrained_seed

    out = save_pretrained_seed(
        args.out, image_size=args.image_size, max_text_len=args.max_text_len, vocab_file=args.vocab, onnx_path=args.onnx
    )
    print(f"pretrained seed checkpoint -> {out}")
    print(json.dumps(json.loads(open_checkpoint(out).metadata["provenance"]), indent=2))
    return 0


def run_export_hf(args: argparse.Namespace) -> int:
    from vlmerge.export.huggingface import export_hf

    result = export_hf(args.merged, args.out, verify=not args.no_verify)
    checked = "" if result.max_abs_difference is None else f"; max |difference| {result.max_abs_difference:.2g}"
    print(f"{result.architecture} (transformers {result.transformers_version}) -> {result.path}{checked}")
    return 0


COMMANDS = {
    "study": run_study_command,
    "train": run_train,
    "evaluate": run_evaluate,
    "grams": run_grams,
    "fisher": run_fisher,
    "merge": run_merge,
    "tune": run_tune,
    "adamerge": run_adamerge,
    "metrics": run_metrics,
    "inspect": run_inspect,
    "import-vit": run_import_vit,
    "export-hf": run_export_hf,
}
