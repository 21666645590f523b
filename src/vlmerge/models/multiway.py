"""The only place that knows about modality experts.

`multiway(factory, modalities)` returns the bare module when there is a single set of
weights, or a `Multiway` holding one copy per modality; parameter names then differ by
exactly one `.{modality}` segment, so merging is a rename plus arithmetic.
"""

from collections.abc import Callable, Sequence

from torch import nn

from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality


class Multiway(nn.ModuleDict):
    """One copy of a sub-module per modality, keyed by the modality's short name."""

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(Modality(name) for name in self.keys())


def multiway(factory: Callable[[], nn.Module], modalities: Sequence[Modality] | None) -> nn.Module:
    if not modalities:
        return factory()
    return Multiway({modality.value: factory() for modality in modalities})


def select_expert(module: nn.Module, modality: Modality) -> nn.Module:
    """The expert `modality` uses; a shared module serves every modality."""
    if not isinstance(module, Multiway):
        return module
    if modality.value not in module:
        raise ConfigError(f"no {modality.value!r} expert here (experts: {[m.value for m in module.modalities]})")
    return module[modality.value]
