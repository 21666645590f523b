"""Gram matrices for RegMean, collected with forward hooks during plain forward passes.

For every linear layer of every expert, G = sum over the tokens that expert actually saw of
x x^T: each batch's product in the activations' precision (float32 matrix multiplies run
several times faster than float64 ones), summed over batches in float64. The input of qkv
is the output of norm1, of proj the attention output, of fc1 the output of norm2, of fc2
the activation. Padding tokens are left out: a pre-hook on each block records the token
mask and segments of the stream it is processing, and an expert that sees one segment of a
stream (a pair whose text and image attend to each other) takes that segment's mask. By default the sum is
not divided by the token count (RegMean's objective is the total squared error per expert).
"""

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vlmerge.core.keys import parse_block_path
from vlmerge.core.threads import one_thread
from vlmerge.merging.plan import LINEAR_SLOTS
from vlmerge.models.transformer import Block


def gram_modules(model: nn.Module) -> dict[str, tuple[nn.Linear, str | None]]:
    """Linear layers inside attention and FFN, with the modality of their expert (None if shared)."""
    found = {}
    for name, module in model.named_modules():
        path = parse_block_path(name) if isinstance(module, nn.Linear) else None
        if path is not None and path.slot in LINEAR_SLOTS:
            found[name] = (module, path.modality.value if path.modality else None)
    return found


class GramCollector:
    """Context manager that accumulates X^T X for each linear layer of `model`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = gram_modules(model)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self._mask: torch.Tensor | None = None
        self._segments: tuple = ()
        self._handles: list = []

    def __enter__(self) -> "GramCollector":
        for block in self.model.modules():
            if isinstance(block, Block):
                self._handles.append(block.register_forward_pre_hook(self._remember_mask))
        for name, (module, _) in self.modules.items():
            self._handles.append(module.register_forward_hook(self._accumulate_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _remember_mask(self, block: nn.Module, args: tuple) -> None:
        self._segments = args[1]
        self._mask = args[2] if len(args) > 2 else None

    def _token_mask(self, modality: str | None, tokens: int) -> torch.Tensor | None:
        """The mask of the tokens an expert's Linear sees: the stream's, or its own segment's."""
        if self._mask is None or self._mask.shape[1] == tokens:
            return self._mask
        (segment,) = [s for s in self._segments if s.modality.value == modality]
        return self._mask[:, segment.start : segment.stop]

    def _accumulate_hook(self, name: str):
        modality = self.modules[name][1]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            mask = self._token_mask(modality, x.shape[1])
            rows = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])  # (tokens, in)
            rows = rows.detach()
            gram = (rows.T @ rows).to(torch.float64)
            if name in self.sums:
                self.sums[name] += gram
            else:
                self.sums[name] = gram
            self.tokens[name] += rows.shape[0]

        return hook

    def all_reduce(self) -> None:
        """Sum matrices and token counts over a torch.distributed process group.

        Every rank reduces every module (zeros where its shard never reached that expert), so
        all ranks issue the same collectives in the same order.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in sorted(self.modules):
            linear = self.modules[name][0]
            gram = self.sums.get(name)
            if gram is None:
                gram = torch.zeros(
                    linear.in_features, linear.in_features, dtype=torch.float64, device=linear.weight.device
                )
            count = torch.tensor([float(self.tokens[name])], dtype=torch.float64, device=gram.device)
            dist.all_reduce(gram)
            dist.all_reduce(count)
            if count.item() > 0:
                self.sums[name], self.tokens[name] = gram, int(count.item())

    def result(self, normalize: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        grams = {n: (g / max(self.tokens[n], 1) if normalize else g).cpu() for n, g in self.sums.items()}
        info = {n: {"modality": self.modules[n][1], "tokens": self.tokens[n], "normalized": normalize} for n in grams}
        return grams, info


@one_thread()  # the same bytes on every machine (core/threads.py)
def collect_grams(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, normalize: bool = False, progress: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Run `model(**batch)` over the batches and return the Gram matrices and their token counts."""
    was_training = model.training
    model.eval()
    with GramCollector(model) as collector, torch.no_grad():
        for batch in tqdm(batches, desc="grams", disable=not progress, unit="batch"):
            model(**batch)
        collector.all_reduce()
    model.train(was_training)
    return collector.result(normalize)
