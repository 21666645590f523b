"""mergekit on the same expert tensors as a vlmerge merge: model directories, configs, a timed child.

mergekit merges whole models, so each expert becomes one model directory holding its tensors under
the merged (modality-agnostic) names, and the seed checkpoint the base model. mergekit treats a
tensor missing from some models as optional and merges the models that have it: the vl model holds
only the fusion layers' tensors, where vl experts exist, and the tensors a merge passes through
(embeddings, heads) are in the base alone, which the task-arithmetic methods then return as they
are. linear has no base, so for it they are one more model, `shared`, which holds nothing else
(w t / w = t). Its weights r, 1 - r and 1/2, normalised, give the paper's r, 1 - r below the fusion
layer and 2/3 r, 2/3 (1 - r), 1/3 from it on, which is vlmerge's interpolation. (In the v model
instead, the task-arithmetic methods would sparsify them too, and mergekit's DELLA fails on a
tensor whose second dimension is 1, such as a class token: its rank range there is 0/0.)

config.json: mergekit infers the architecture from the tensor names when it knows none, but
transformers must parse the config first. A known model_type (ViT) that transformers cannot build
as a causal LM makes it fall back to the names in the files; BERT's, say, would instead be built and
its own tensor names taken for ours.

mergekit 0.1.5 is installed with --no-deps (its pins would pull a CUDA torch); of its dependencies
it needs immutables, peft and accelerate besides what vlmerge installs (see the Makefile's bench).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from vlmerge.core.modality import Modality
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging.plan import build_merge_plan

PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
IMPORTS = """
import logging
logging.disable(logging.WARNING)  # it warns that it infers the architecture, for every model
import transformers
transformers.logging.set_verbosity_error()
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
"""
CHILD = f"""
import json, sys, time
{IMPORTS}
config, out, random_seed = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=random_seed)
start = time.perf_counter()
run_merge(MergeConfiguration.model_validate(config), out, options)
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "peak_rss_bytes": {PEAK_RSS}}}))
"""
BASELINE = f"{IMPORTS}\nprint({PEAK_RSS})"  # interpreter, torch, transformers and mergekit imported


@dataclass(frozen=True)
class MergekitMethod:
    """A mergekit method and its parameters: `each` per model (all experts alike), `shared` once."""

    name: str
    each: dict[str, Any]
    shared: dict[str, Any] = field(default_factory=dict)
    base: bool = True  # the task-arithmetic family needs the seed as base_model; linear does not
    weights: dict[str, float] | None = None  # per expert where they differ (linear)

    def config(self, models: dict[str, Path]) -> dict[str, Any]:
        names = [m.value for m in (Modality.V, Modality.L, Modality.VL)] + ([] if self.base else ["shared"])
        weights = self.weights or {}
        entries = [
            {
                "model": str(models[name]),
                "parameters": {**self.each, **({"weight": weights[name]} if name in weights else {})},
            }
            for name in names
        ]
        config = {"merge_method": self.name, "dtype": "float32", "models": entries, "parameters": self.shared}
        return {**config, "base_model": str(models["base"])} if self.base else config


def write_models(source: Path, seed: Path, root: Path, width: int, depth: int) -> dict[str, Path]:
    """One directory per expert (v, l, vl), the seed (base) and the passed-through tensors (shared),
    from vlmerge's specific checkpoint and seed."""
    reader, origin = open_checkpoint(source), open_checkpoint(seed)
    plan = build_merge_plan({key: reader.shape(key) for key in reader.keys})
    tensors: dict[str, dict] = {"v": {}, "l": {}, "vl": {}, "base": {}, "shared": {}}
    for key in plan.passthrough:
        tensors["shared"][key] = reader.get(key)
    for group in plan.groups:
        for modality, expert in group.experts.items():
            tensors[modality.value][group.target] = reader.get(expert.key)
    tensors["base"] = {key: origin.get(key) for key in origin.keys}
    config = {
        "architectures": ["VLMergeExpert"],
        "model_type": "vit",
        "hidden_size": width,
        "num_hidden_layers": depth,
    }
    models = {}
    for name, state in tensors.items():
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(config))
        models[name] = directory
    return models


def output_file(out: Path) -> Path:
    """The safetensors file mergekit wrote (one shard at these sizes)."""
    shards = sorted(out.glob("*.safetensors"))
    if len(shards) != 1:
        raise RuntimeError(f"{out}: expected one safetensors shard, found {[s.name for s in shards]}")
    return shards[0]
