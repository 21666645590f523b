"""A stage of the study's graph: what one cached directory holds, named by the hash of its kind, its
settings and the names of the stages it reads (so equal stages are one, and a name says what made it)."""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path

from vlmerge.core.config import StrictConfig


class StageKind(str, Enum):
    TOKENIZER = "tokenizer"  # the study's shared vocabulary
    PRETRAINED = "pretrained"  # the imported ViT-S/14 + MiniLM embeddings
    UNTRAINED = "untrained"  # the seed stage's model at step 0: the no-pre-training control
    SEED = "seed"  # modality-agnostic pre-training (seed pre-training, or the from-scratch baseline)
    MULTIWAY = "specific"  # modality-specific (multiway) pre-training
    GRAMS = "grams"  # Gram matrices for RegMean, or collected sequentially for RegMean++
    FISHER = "fisher"  # diagonal Fisher statistics for Fisher merging
    MERGE = "merge"
    FINETUNE = "finetune"  # full fine-tuning, or the linear probe (frozen backbone)
    ZERO_SHOT = "zeroshot"
    HELDOUT = "heldout"  # the pre-training objectives on held-out pairs, per pair
    PATH = "path"  # the held-out objectives along the interpolation path between a model's experts
    MERGEABILITY = "mergeability"  # distances between a specific model's experts
    GALLERY = "gallery"


MODEL_FILE = "model.safetensors"
OUTPUT_FILES = {
    StageKind.TOKENIZER: "tokenizer.json",
    StageKind.GRAMS: "grams.safetensors",
    StageKind.FISHER: "fisher.safetensors",
}


@dataclass(frozen=True, eq=False)
class Stage:
    kind: StageKind
    settings: StrictConfig  # everything the stage's output depends on, besides its inputs (see study/stages.py)
    inputs: Mapping[str, "Stage"] = field(default_factory=dict)  # role -> the stage whose output it reads
    label: str = ""

    @cached_property
    def key(self) -> str:
        identity = {
            "kind": self.kind.value,
            "settings": self.settings.model_dump(mode="json"),
            "inputs": {role: stage.key for role, stage in self.inputs.items()},
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        """The stage's directory under the study's cache."""
        return f"{self.kind.value}-{self.key[:16]}"

    @property
    def output(self) -> Path:
        """The file its readers take, relative to its directory."""
        return Path(OUTPUT_FILES.get(self.kind, MODEL_FILE))
