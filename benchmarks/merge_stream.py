"""Streamed merge of a base-size checkpoint: time against a durable file copy, peak RSS against the
file size, and both side by side with mergekit on the same expert tensors.

Usage: python benchmarks/merge_stream.py [--size base] [--methods interpolation ties ...] [--runs 3]
       [--no-mergekit] [--workdir DIR]
Every registered method family is timed (`--methods` chooses); the statistics-based ones get
synthetic inputs (identity Gram matrices, random Fisher diagonals), since their cost is the merge's.
Goals: no method slower than mergekit's counterpart; interpolation within 1.5x a durable copy of the
file; RegMean's peak RSS at most 0.3x the checkpoint file; each SVD method (tsv, iso_c, iso_cts) at
most 0.5x FusionBench's own function on the same tensors and at most 5x the durable copy. Iso-C is also
timed with precision=float32 (iso_c_float32: float32 arithmetic where the summed vector is conditioned for it).

Two copies anchor the time: a plain copy (the kernel copies the bytes, nothing reaches the disk
before the command returns) and a durable copy written the way every vlmerge output is
(temporary file, fsync, rename), which is what a merge pays for on top of its own work. Each
measurement runs in a fresh subprocess, so its peak RSS (VmHWM) belongs to that step alone, and is
given above the peak of a child that only imports what that side needs (interpreter, torch; for
mergekit also transformers). Each run measures every step once, in turn, so that a slow spell of a
shared machine falls on all of them; the figures are the median of the runs and their range.

The experts are the seed plus a small perturbation each (as fine-tuning leaves them), so the
modality vectors are small and dense, as in practice. mergekit (benchmarks/support/mergekit_side.py)
gets each expert as a model directory and the seed as its base model, the same options where both
have them; where the two define a method differently, the note under the table says how.

The SVD methods are also timed in this process beside FusionBench's functions (fusion-bench 0.2.33,
installed with --no-deps; its two pure-torch files are loaded by path): the same task vectors of every
expert group, ours through the registered function as the engine runs it (each group on one thread,
as many groups side by side as the process has threads), FusionBench's on the tensors' dtype (float32,
as it runs on this checkpoint) at the process's thread count, one after the other in each run. Agreement is max |ours - FusionBench| / max |FusionBench| over the merged modality
vectors, against FusionBench on float64 copies of the same vectors (`--reference-float64`, once).
"""

import argparse
import contextlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from support.mergekit_side import BASELINE as MERGEKIT_BASELINE
from support.mergekit_side import CHILD as MERGEKIT_CHILD
from support.mergekit_side import MergekitMethod, output_file, write_models

from vlmerge.core.keys import parse_block_path
from vlmerge.core.threads import one_thread
from vlmerge.io.checkpoint import file_sha256, open_checkpoint
from vlmerge.io.grams import save_grams
from vlmerge.io.statistics import save_fisher
from vlmerge.merging import MERGE_METHODS, MergeInputs
from vlmerge.merging.grams import gram_modules
from vlmerge.merging.plan import build_merge_plan, expand_to_experts
from vlmerge.merging.regmean_pp import SEQUENTIAL, SequentialOptions
from vlmerge.merging.side_by_side import ordered_map
from vlmerge.merging.svd import gram
from vlmerge.models import VLTransformer, model_config, save_model

FLOOR_DTYPES = (torch.float64, torch.float32)
GOALS = {"copy": 1.5, "regmean_memory": 0.3, "svd_reference": 0.5, "svd_copy": 5.0}
# FusionBench's function for each SVD method: (file under fusion_bench/, function, options).
FUSION_BENCH = {
    "tsv": ("method/task_singular_vector/utils/TSVM_utils.py", "compute_and_sum_svd_mem_reduction", {}),
    "iso_c": ("method/isotropic_merging/iso_utils.py", "iso_c", {}),
    "iso_cts": ("method/isotropic_merging/iso_utils.py", "iso_cts", {"common_space_fraction": 0.8}),
}
TESTS = str(Path(__file__).resolve().parents[1] / "tests")  # the tests' loader of FusionBench's files
RANDOM_SEED = 0
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would include the forked parent's image.
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
CHILD = f"""
import json, shutil, sys, time
from vlmerge.merging import merge_checkpoint
task, source, out, method, options, seed, grams, fisher = sys.argv[1:9]
start = time.perf_counter()
if task == "copy":
    shutil.copyfile(source, out)
elif task == "durable-copy":
    from vlmerge.io.atomic import atomic_path
    with atomic_path(out) as tmp:
        shutil.copyfile(source, tmp)
else:
    merge_checkpoint(
        source, method, json.loads(options), out=out,
        seed_checkpoint=seed or None, grams=grams or None, fisher=fisher or None,
    )
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "peak_rss_bytes": {PEAK_RSS}}}))
"""


@dataclass(frozen=True)
class Method:
    """A vlmerge method with the options it is timed with, and mergekit's counterpart if it has one."""

    options: dict[str, Any]
    mergekit: MergekitMethod | None = None
    note: str = ""
    seed: bool = True  # merges against the seed checkpoint
    grams: str = ""  # "plain" (RegMean) or "sequential" (RegMean++) Gram matrices
    fisher: bool = False  # Fisher statistics
    registered: str = ""  # the registered method, where the name is a variant of it (other options)


METHODS = {
    "interpolation": Method(
        {"ratio": 0.5},
        MergekitMethod(
            "linear", {}, {"normalize": True}, base=False, weights={"v": 0.5, "l": 0.5, "vl": 0.5, "shared": 1.0}
        ),
        "linear, weights r, 1 - r, 1/2 normalised: the same ratios, the same result to rounding",
        seed=False,
    ),
    "arithmetic": Method(
        {"lam": 0.5},
        MergekitMethod("task_arithmetic", {"weight": 0.5}),
        "task_arithmetic with weight lam per model: the same formula",
    ),
    "ties": Method(
        {"density": 0.2, "lam": 1.0},
        MergekitMethod("ties", {"density": 0.2, "weight": 1.0}, {"normalize": True}),
        "keeps floor(density n) by a full argsort (vlmerge: ceil, by an unsorted top-k); elects + where "
        "the signed mass is 0 (vlmerge: no sign, 0)",
    ),
    "dare_ties": Method(
        {"drop": 0.5, "lam": 1.0, "random_seed": RANDOM_SEED},
        MergekitMethod("dare_ties", {"density": 0.5, "weight": 1.0}, {"normalize": True}),
        "normalize set, so both average the agreeing entries (mergekit's default sums them); rescales "
        "to the L1 norm (vlmerge: 1/(1 - p)); its own random masks",
    ),
    "breadcrumbs": Method(
        {"density": 0.9, "gamma": 0.01, "lam": 0.5},
        MergekitMethod("breadcrumbs", {"density": 0.9, "gamma": 0.01, "weight": 0.5}),
        "floor counts (vlmerge: ceil for the kept entries); a full sort per tensor (vlmerge: a radix sort)",
    ),
    "della": Method(
        {"density": 0.5, "epsilon": 0.15, "lam": 0.5, "random_seed": RANDOM_SEED},
        MergekitMethod("della_linear", {"density": 0.5, "epsilon": 0.15, "weight": 0.5}),
        "della_linear: ranks magnitudes per row (vlmerge: over the tensor), rescales to the L1 norm "
        "(vlmerge: 1/p_i), its own random masks",
    ),
    "della_ties": Method(
        {"density": 0.5, "epsilon": 0.15, "lam": 1.0, "random_seed": RANDOM_SEED},
        MergekitMethod("della", {"density": 0.5, "epsilon": 0.15, "weight": 1.0}),
        "della (TIES consensus): as della_linear above",
    ),
    "breadcrumbs_ties": Method(
        {"density": 0.9, "gamma": 0.01, "lam": 1.0},
        MergekitMethod("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01, "weight": 1.0}, {"normalize": True}),
        "normalize set, so both average the agreeing entries; floor counts, a full sort",
    ),
    "dare": Method(
        {"drop": 0.5, "lam": 0.5, "random_seed": RANDOM_SEED},
        MergekitMethod("dare_linear", {"density": 0.5, "weight": 0.5}),
        "dare_linear: rescales to the L1 norm (vlmerge: 1/(1 - p)); its own random masks",
    ),
    "regmean": Method({"alpha": 1.0}, None, "no mergekit counterpart", seed=False, grams="plain"),
    "regmean_pp": Method({"alpha": 1.0}, None, "no mergekit counterpart", seed=False, grams="sequential"),
    "fisher": Method({}, None, "no mergekit counterpart", seed=False, fisher=True),
    "tsv": Method({"lam": 1.0}, None, "no mergekit counterpart"),
    "iso_c": Method({"lam": 1.0}, None, "no mergekit counterpart"),
    "iso_c_float32": Method(
        {"lam": 1.0, "precision": "float32"}, None, "iso_c, float32 where conditioned for it", registered="iso_c"
    ),
    "iso_cts": Method({"lam": 1.0}, None, "no mergekit counterpart"),
}
DEFAULT_METHODS = [
    "interpolation",
    "arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "della",
    "regmean",
    "regmean_pp",
    "fisher",
    "tsv",
    "iso_c",
    "iso_c_float32",
    "iso_cts",
]


def registered(name: str) -> str:
    """The registered method a timed name runs."""
    return METHODS[name].registered or name


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)  # bytes above the side's import baseline

    def add(self, result: dict, baseline: int) -> None:
        self.seconds.append(result["seconds"])
        self.peak.append(result["peak_rss_bytes"] - baseline)

    def time(self) -> float:
        return statistics.median(self.seconds)

    def memory(self) -> float:
        return statistics.median(self.peak)

    def time_text(self) -> str:
        if len(self.seconds) == 1:
            return f"{self.time():7.2f} s (once)"
        return f"{self.time():7.2f} s [{min(self.seconds):.2f}-{max(self.seconds):.2f}]"

    def memory_text(self, file_bytes: int) -> str:
        return f"{self.memory() / 2**20:5.0f} MiB {self.memory() / file_bytes:4.2f}x"


def run_child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({' '.join(args[1:3])}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def import_baseline(code: str) -> int:
    """Peak RSS of a child that only imports what a side needs."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def fresh(path: Path) -> Path:
    """Remove a previous run's output first (outside the timing), so no step pays to unlink one."""
    if path.is_dir():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    return path


def make_inputs(size: str, workdir: Path, methods: dict[str, Method]) -> "Inputs":
    """A modality-specific checkpoint whose experts are the seed plus a small perturbation each, the
    seed as a modality-agnostic checkpoint, and the statistics the methods need: identity Gram
    matrices (float64; recorded as a sequential pass for RegMean++) and random Fisher diagonals."""
    torch.manual_seed(0)
    config = model_config(size)
    seed_model = VLTransformer(config.agnostic())
    seed_state = seed_model.state_dict()
    model = VLTransformer(config)
    expert_keys = [key for key in model.state_dict() if key not in seed_state]
    state = {**seed_state, **expand_to_experts(seed_state, expert_keys)}
    with torch.no_grad():
        for key in expert_keys:
            state[key] += 0.01 * state[key].std().nan_to_num() * torch.randn_like(state[key])
    model.load_state_dict({key: state[key] for key in model.state_dict()})
    inputs = Inputs(
        save_model(model, workdir / "specific.safetensors"), save_model(seed_model, workdir / "seed.safetensors")
    )
    kinds = {m.grams for m in methods.values()} - {""}
    identity = {
        name: torch.eye(linear.in_features, dtype=torch.float64) for name, (linear, _) in gram_modules(model).items()
    }
    # The statistics record the checkpoint they are for: a merge refuses ones whose source it cannot verify.
    checkpoint = {"path": str(inputs.source), "sha256": file_sha256(inputs.source)}
    for kind in kinds:
        provenance = {"data": "identity (benchmark)", "checkpoint": checkpoint}
        if kind == "sequential":
            provenance[SEQUENTIAL] = SequentialOptions().model_dump(mode="json")
        inputs.grams[kind] = save_grams(workdir / f"grams-{kind}.safetensors", identity, {}, provenance)
    if any(m.fisher for m in methods.values()):
        fisher = {key: torch.rand_like(state[key]) for key in expert_keys}
        info = {key: {"modality": parse_block_path(key).modality.value, "batches": 1} for key in expert_keys}
        inputs.fisher = save_fisher(
            workdir / "fisher.safetensors", fisher, info, {"data": "random (benchmark)", "checkpoint": checkpoint}
        )
    return inputs


@dataclass
class Inputs:
    source: Path
    seed: Path
    grams: dict[str, Path] = field(default_factory=dict)  # by kind: plain, sequential
    fisher: Path | None = None


def agreement(ours: Path, theirs: Path) -> float:
    """max |ours - theirs| over the merged tensors, relative to max |ours|: 0 up to rounding where the
    two compute the same thing."""
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    difference = scale = 0.0
    for key in a.keys:
        x, y = a.get(key), b.get(key)
        difference = max(difference, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
        scale = max(scale, float(x.abs().max()) if x.numel() else 0.0)
    return difference / scale if scale else difference


def fusion_bench_function(method: str) -> Callable | None:
    """FusionBench's function for `method`, loaded from its file as the tests load it (the package modules it
    imports stubbed: `import fusion_bench` pulls in lightning and omegaconf); None where it is not installed."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from reference_code import SVD_STUBS, load_by_path

    relative, name, _ = FUSION_BENCH[registered(method)]
    module = load_by_path("fusion_bench", relative, SVD_STUBS)
    return None if module is None else getattr(module, name)


@dataclass
class Groups:
    """Every merged group of the checkpoint: its experts' tensors and the seed's, by merged key."""

    experts: dict[str, dict[str, torch.Tensor]]
    origin: dict[str, torch.Tensor]

    @classmethod
    def read(cls, source: Path, seed: Path) -> "Groups":
        a, b = open_checkpoint(source), open_checkpoint(seed)
        plan = build_merge_plan({key: a.shape(key) for key in a.keys})
        experts = {
            g.target: {m.value: a.get(e.key) for m, e in g.experts.items()} for g in plan.groups if len(g.experts) > 1
        }
        return cls(experts, {key: b.get(key) for key in experts})

    def task_vectors(self, dtype: torch.dtype) -> list[list[dict[str, torch.Tensor]]]:
        """FusionBench's input, one call per set of experts: a list of task-vector state dicts."""
        by_experts: dict[tuple[str, ...], dict[str, dict[str, torch.Tensor]]] = {}
        for key, ws in self.experts.items():
            by_experts.setdefault(tuple(ws), {})[key] = ws
        return [
            [{key: ws[m].to(dtype) - self.origin[key].to(dtype) for key, ws in groups.items()} for m in modalities]
            for modalities, groups in by_experts.items()
        ]


def ours_svd(method: str, groups: Groups, dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds to merge every group as the engine does (each on one thread, one group per core side by side;
    FusionBench's mean for the other tensors), and the merged modality vectors (float64)."""
    entry = MERGE_METHODS.get(registered(method))
    options = entry.options.parse({**METHODS[method].options, "lam": 1.0, "non_matrix": "mean"})
    workers = torch.get_num_threads()

    def merge(item: tuple[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        key, ws = item
        return entry.fn(
            MergeInputs(key, {m: w.to(dtype) for m, w in ws.items()}, origin=groups.origin[key].to(dtype)), options
        )

    start = time.perf_counter()
    with one_thread():
        merged = dict(zip(groups.experts, ordered_map(merge, groups.experts.items(), workers)))
    seconds = time.perf_counter() - start
    return seconds, {key: value.double() - groups.origin[key].double() for key, value in merged.items()}


def decomposition_floor(groups: Groups, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds for the eigendecompositions an exact SVD method cannot do without, in `dtype`, run as the engine
    runs groups: one per 2-D group (of the summed vector's Gram matrix; Iso-C's whole spectrum) and one per
    expert (each vector's own; what TSV-M and Iso-CTS decompose at least)."""
    tall_vectors = [
        [
            (v if v.shape[0] >= v.shape[1] else v.mT).to(dtype)
            for v in (w.double() - groups.origin[key].double() for w in ws.values())
        ]
        for key, ws in groups.experts.items()
        if groups.origin[key].ndim == 2
    ]

    def decompose(matrices: list[torch.Tensor]) -> None:
        for matrix in matrices:
            torch.linalg.eigh(gram(matrix))  # the Gram matrix as the methods form it

    seconds, workers = [], torch.get_num_threads()
    for per_group in (lambda vectors: [sum(vectors)], lambda vectors: vectors):
        start = time.perf_counter()
        with one_thread():
            list(ordered_map(decompose, map(per_group, tall_vectors), workers))
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def reference_svd(method: str, function: Callable, groups: Groups, dtype: torch.dtype) -> tuple[float, dict]:
    """Seconds for FusionBench's function over every group (its per-key printing silenced), and its result."""
    batches = groups.task_vectors(dtype)
    merged = {}
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        for task_vectors in batches:
            merged.update(function(task_vectors, accelerator="cpu", **FUSION_BENCH[registered(method)][2]))
    return time.perf_counter() - start, merged


def relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """max |ours - theirs| / max |theirs| over the merged 2-D modality vectors."""
    keys = [key for key in ours if ours[key].ndim == 2]
    difference = max(float((ours[k] - theirs[k].double()).abs().max()) for k in keys)
    return difference / max(float(theirs[k].double().abs().max()) for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--runs", type=int, default=3, help="measurements of each step (median and range)")
    parser.add_argument(
        "--repeat-under",
        type=float,
        default=15.0,
        help="seconds: a step slower than this in the first run is measured once (its noise is a small part)",
    )
    parser.add_argument("--no-mergekit", action="store_true", help="vlmerge and the copies only")
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--no-fusion-bench", action="store_true", help="skip the SVD methods' in-process comparison with FusionBench"
    )
    parser.add_argument(
        "--reference-float64",
        action="store_true",
        help="also run FusionBench once on float64 vectors and report the agreement against it",
    )
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlmerge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    methods = {name: METHODS[name] for name in args.methods}
    use_mergekit = not args.no_mergekit and any(m.mergekit for m in methods.values())

    inputs = make_inputs(args.size, workdir, methods)
    source, seed = inputs.source, inputs.seed
    file_bytes = source.stat().st_size
    config = model_config(args.size)
    models = write_models(source, seed, workdir / "mergekit", config.width, config.depth) if use_mergekit else {}
    ours_base = import_baseline(f"import vlmerge.merging; print({PEAK_RSS})")
    theirs_base = import_baseline(MERGEKIT_BASELINE) if use_mergekit else 0

    copies = {"copy": Samples(), "durable-copy": Samples()}
    ours = {name: Samples() for name in methods}
    theirs = {name: Samples() for name, m in methods.items() if m.mergekit and use_mergekit}
    agree: dict[str, float] = {}
    references = {}
    floors = {dtype: (Samples(), Samples()) for dtype in FLOOR_DTYPES}
    if not args.no_fusion_bench:
        functions = {name: fusion_bench_function(name) for name in methods if registered(name) in FUSION_BENCH}
        references = {name: (function, Samples(), Samples(), {}) for name, function in functions.items() if function}
        groups = Groups.read(source, seed) if references else None
    for run in range(args.runs):
        for task, samples in copies.items():
            out = fresh(workdir / f"{task}.safetensors")
            samples.add(run_child([CHILD, task, str(source), str(out), "", "{}", "", "", ""]), ours_base)
        for name, method in methods.items():
            out = workdir / f"merged-{name}.safetensors"
            if run == 0 or ours[name].time() < args.repeat_under:
                argv = [CHILD, "merge", str(source), str(fresh(out)), registered(name), json.dumps(method.options)]
                argv += [str(seed) if method.seed else "", str(inputs.grams.get(method.grams, ""))]
                argv += [str(inputs.fisher) if method.fisher else ""]
                ours[name].add(run_child(argv), ours_base)
            if name in theirs and (run == 0 or theirs[name].time() < args.repeat_under):
                their_out = fresh(workdir / f"mergekit-{name}")
                config_json = json.dumps(method.mergekit.config(models))
                theirs[name].add(
                    run_child([MERGEKIT_CHILD, config_json, str(their_out), str(RANDOM_SEED)]), theirs_base
                )
                if run == 0:
                    agree[name] = agreement(out, output_file(their_out))
        if references:
            for dtype, samples in floors.items():
                for floor, seconds in zip(samples, decomposition_floor(groups, dtype)):
                    floor.seconds.append(seconds)
        for name, (function, our_side, their_side, differences) in references.items():
            seconds, merged = ours_svd(name, groups, torch.float32)
            our_side.seconds.append(seconds)
            seconds, theirs_merged = reference_svd(name, function, groups, torch.float32)
            their_side.seconds.append(seconds)
            if run == 0:
                differences["fusion_bench float32"] = relative_difference(merged, theirs_merged)
                if args.reference_float64:
                    exact = reference_svd(name, function, groups, torch.float64)[1]
                    differences["fusion_bench float64"] = relative_difference(
                        ours_svd(name, groups, torch.float64)[1], exact
                    )
                    differences["its float32 vs its float64"] = relative_difference(theirs_merged, exact)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    report(args, file_bytes, copies, ours, theirs, agree, methods)
    report_references(references, copies["durable-copy"].time(), ours, floors)
    if args.workdir is None:
        shutil.rmtree(workdir)


def report(args, file_bytes, copies, ours, theirs, agree, methods) -> None:
    durable = copies["durable-copy"].time()
    print(
        f"checkpoint: {args.size}, {file_bytes / 2**20:.0f} MiB; {args.runs} runs, median [range]; "
        f"{torch.get_num_threads()} torch threads; peak RSS above each side's imports, and x the file"
    )
    print(f"plain copy     {copies['copy'].time_text()}")
    print(f"durable copy   {copies['durable-copy'].time_text()}   (temporary file, fsync, rename)")
    print(
        f"{'method':<17}{'vlmerge':<24}{'/durable':>8}  {'peak RSS':<16}| {'mergekit':<17}{'time':<24}{'peak RSS':<16}| time, memory vs mergekit"
    )
    verdicts = []
    for name, samples in ours.items():
        line = f"{name:<17}{samples.time_text():<24}{samples.time() / durable:7.2f}x  {samples.memory_text(file_bytes):<16}"
        if name in theirs:
            other = theirs[name]
            time_ratio, memory_ratio = samples.time() / other.time(), samples.memory() / max(other.memory(), 1)
            line += f"| {methods[name].mergekit.name:<17}{other.time_text():<24}{other.memory_text(file_bytes):<16}"
            line += f"| {time_ratio:.2f}x, {memory_ratio:.2f}x"
            verdicts.append((f"{name} no slower than mergekit's {methods[name].mergekit.name}", time_ratio <= 1.0))
        print(line)
    if "interpolation" in ours:
        ratio = ours["interpolation"].time() / durable
        verdicts.append((f"interpolation <= {GOALS['copy']}x the durable copy ({ratio:.2f}x)", ratio <= GOALS["copy"]))
    if "regmean" in ours:
        ratio = ours["regmean"].memory() / file_bytes
        goal = GOALS["regmean_memory"]
        verdicts.append((f"regmean peak RSS <= {goal}x the file ({ratio:.2f}x)", ratio <= goal))
    print("goals: " + "; ".join(f"{text}: {'met' if met else 'MISSED'}" for text, met in verdicts))
    if theirs:
        print("how mergekit's counterparts differ (agreement: max |vlmerge - mergekit| / max |vlmerge|, first run):")
        for name in theirs:
            print(f"  {name} vs {methods[name].mergekit.name} (agreement {agree[name]:.1e}): {methods[name].note}")
        print("  mergekit does not fsync its output; vlmerge's times include making the file durable")


def report_references(
    references: dict, durable: float, ours: dict[str, Samples], floors: dict[torch.dtype, tuple[Samples, Samples]]
) -> None:
    """The SVD methods beside FusionBench's functions on the same tensors, in this process, and the time the
    eigendecompositions alone take, in float64 (no exact method of the family is faster) and in float32 (no
    method of it at all, whatever its rounding)."""
    if not references:
        return
    print(
        f"SVD methods beside FusionBench 0.2.33 on the same task vectors, both on {torch.get_num_threads()} threads "
        f"(ours: one group per thread, as the engine merges), median [range]; the merge's whole time (file to file) against the durable copy:"
    )
    verdicts = []
    for name, (_, our_side, their_side, differences) in references.items():
        ratio = our_side.time() / their_side.time()
        agreement = ", ".join(f"{value:.1e} vs {what}" for what, value in differences.items())
        print(
            f"  {name:<8} ours {our_side.time_text()}  FusionBench {their_side.time_text()}  {ratio:.2f}x;"
            f" whole merge {ours[name].time() / durable:.2f}x the copy; agreement {agreement}"
        )
        verdicts.append(
            (f"{name} <= {GOALS['svd_reference']}x FusionBench ({ratio:.2f}x)", ratio <= GOALS["svd_reference"])
        )
        copy_ratio = ours[name].time() / durable
        verdicts.append(
            (f"{name} <= {GOALS['svd_copy']}x the durable copy ({copy_ratio:.2f}x)", copy_ratio <= GOALS["svd_copy"])
        )
    for dtype, (per_group, per_expert) in floors.items():
        print(
            f"  floor: {str(dtype).removeprefix('torch.')} eigendecompositions alone, one per 2-D group (Iso-C)"
            f" {per_group.time_text()} = {per_group.time() / durable:.2f}x the copy; one per expert (TSV-M, Iso-CTS)"
            f" {per_expert.time_text()} = {per_expert.time() / durable:.2f}x the copy"
        )
    print("goals: " + "; ".join(f"{text}: {'met' if met else 'MISSED'}" for text, met in verdicts))


if __name__ == "__main__":
    main()
