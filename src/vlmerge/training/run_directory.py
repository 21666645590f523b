"""The run directory a stage runs in: its lock, its resolved config and its manifest.

A run directory keeps the resolved config it was started with (`config.yaml`) and a manifest of
what it holds (`manifest.json`: the config's hash, with its input files named by content, the
tokenizer's hash and the last checkpointed step); starting it again with a different config, or
on files that no longer match the manifest, is refused rather than silently mixing two runs. Each
checkpoint carries a copy of the manifest, which stands in for a lost `manifest.json`. A run holds
the directory's lock (an OS file lock, dropped when its process dies) from start to end.
"""

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Self

import torch
import yaml

from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.io.atomic import atomic_path
from vlmerge.io.checkpoint import file_sha256
from vlmerge.training.config import StageConfig, read_yaml

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
CHECKPOINT = "checkpoint.pt"  # written by the Trainer
CHECKPOINT_MANIFEST = "manifest"  # the checkpoint's copy of the manifest, as of its step
LOCK_FILE = ".lock"
INPUT_FIELDS = ("init", "tokenizer.path", "tokenizer.vocab_file")  # config fields that name input files


def input_files(config: StageConfig) -> dict[str, str]:
    """The files the config names as inputs (init, tokenizer.path, tokenizer.vocab_file), by field."""
    resolved = config.model_dump(mode="json")
    return {name: path for name in INPUT_FIELDS if (path := _field(resolved, name))}


def check_inputs(config: StageConfig) -> None:
    for name, path in input_files(config).items():
        if not Path(path).is_file():
            raise ConfigError(f"init {path}: no such checkpoint" if name == "init" else f"{name} {path}: no such file")


def config_identity(config: StageConfig) -> tuple[str, dict[str, str]]:
    """The config's SHA-256 with each input file named by its content instead of its path (so a run
    directory may move with its inputs, and an input replaced under the same path is noticed), and
    those content hashes by field."""
    try:
        inputs = {name: file_sha256(path) for name, path in input_files(config).items()}
    except CheckpointError as error:  # an input the config names: the config's error, as every other input check
        raise ConfigError(str(error)) from None
    identity = config.model_dump(mode="json")
    for name, digest in inputs.items():
        identity = _with_field(identity, name, f"sha256:{digest}")
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(), inputs


@dataclass(frozen=True)
class RunManifest:
    """What a run directory holds, so that a resume can check it before trusting it."""

    config_sha256: str  # see `config_identity`
    inputs: Mapping[str, str] = field(default_factory=dict)  # input field -> SHA-256 of its file
    tokenizer_sha256: str | None = None  # the run's tokenizer.json, once written (pre-training)
    step: int = 0  # the last checkpointed step

    @classmethod
    def from_json(cls, data: Any) -> "RunManifest":
        if not isinstance(data, dict) or not isinstance(data.get("config_sha256"), str):
            raise ValueError("expected an object with config_sha256")
        manifest = cls(data["config_sha256"], data.get("inputs", {}), data.get("tokenizer_sha256"), data.get("step", 0))
        if not isinstance(manifest.inputs, dict) or not all(isinstance(v, str) for v in manifest.inputs.values()):
            raise ValueError("inputs must map fields to SHA-256 strings")
        if manifest.tokenizer_sha256 is not None and not isinstance(manifest.tokenizer_sha256, str):
            raise ValueError("tokenizer_sha256 must be a string")
        if type(manifest.step) is not int or manifest.step < 0:
            raise ValueError(f"step {manifest.step!r} is not a step")
        return manifest


def read_manifest(run_dir: str | os.PathLike) -> RunManifest | None:
    """The run directory's manifest; None if it has none (a plain directory, or a run from before manifests)."""
    path = Path(run_dir) / MANIFEST_FILE
    try:
        return RunManifest.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a run manifest ({error}); the run directory cannot be checked, use a new one"
        ) from None


def checkpoint_manifest(run_dir: str | os.PathLike) -> RunManifest | None:
    """The manifest the run directory's checkpoint carries; None without one (no checkpoint, one from before
    checkpoints carried it, or one that cannot be read: the trainer names what is wrong with it on resume)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return RunManifest.from_json(state[CHECKPOINT_MANIFEST]) if isinstance(state, dict) else None
    except Exception:  # torch raises whatever its zip and pickle readers raise; the trainer reports it
        return None


def update_manifest(run_dir: str | os.PathLike, **changes: Any) -> None:
    """Record `changes` (e.g. the step just checkpointed) in the run directory's manifest, if it has one."""
    if (manifest := read_manifest(run_dir)) is not None:
        write_manifest(run_dir, replace(manifest, **changes))


def write_manifest(run_dir: str | os.PathLike, manifest: RunManifest) -> None:
    with atomic_path(Path(run_dir) / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(manifest), indent=1, sort_keys=True))


class DirectoryLock:
    """An exclusive flock on `directory/.lock`, held until `release()` or the holder's death (the
    kernel drops it then: a SIGKILLed run leaves no stale lock). Python opens files non-inheritable,
    so processes a holder starts (a study's workers and jobs) do not hold it and are not blocked by it."""

    def __init__(self, directory: Path, what: str) -> None:
        path = directory / LOCK_FILE
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._handle: IO[str] | None = open(path, "a+")
        except OSError as error:
            raise ConfigError(f"{path}: cannot create the {what}'s lock file ({error.strerror})") from None
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._handle.seek(0)
            holder = self._handle.read().strip()
            self._handle.close()
            if not isinstance(error, BlockingIOError):
                raise ConfigError(f"{path}: cannot lock ({error.strerror})") from None
            by = f" (process {holder})" if holder.isdigit() else ""
            raise ConfigError(
                f"{directory} is in use by another {what}{by}; wait for it to end or use another directory"
            ) from None
        self._handle.truncate(0)
        self._handle.write(f"{os.getpid()}\n")
        self._handle.flush()

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the last descriptor drops the flock
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class RunDirectory:
    """A run directory locked by this process: what it holds is checked against the config when it is
    opened (nothing written there but the lock file), and `claim()` writes the config and manifest once
    everything else that can fail on the config has been checked, so a config error never claims it."""

    def __init__(self, path: str | os.PathLike, config: StageConfig) -> None:
        check_inputs(config)
        self.path, self.config = Path(path), config
        self.recorded_in = f"{MANIFEST_FILE}'s"  # where the manifest checked against comes from, for messages
        self._restore = False  # the manifest came from the checkpoint: claim() writes it back
        self._lock = DirectoryLock(self.path, "run")
        try:
            self._digest, self._inputs = config_identity(config)
            self.manifest = self._check()
        except BaseException:
            self._lock.release()
            raise

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).exists()

    def _recorded(self) -> RunManifest | None:
        """The run's manifest: manifest.json, else the copy its checkpoint carries (a lost manifest.json
        must not let a changed tokenizer or input pass unnoticed)."""
        if (manifest := read_manifest(self.path)) is not None:
            return manifest
        if (manifest := checkpoint_manifest(self.path)) is not None:
            self.recorded_in, self._restore = f"the record in {CHECKPOINT}", True
        return manifest

    def _check(self) -> RunManifest | None:
        """The manifest of the run the directory holds, if any; refuse one that is not this config's."""
        path, manifest = self.path / CONFIG_FILE, self._recorded()
        if not path.exists():
            if found := [name for name in (MANIFEST_FILE, CHECKPOINT) if (self.path / name).exists()]:
                raise ConfigError(
                    f"{self.path} holds a run ({', '.join(found)}) whose {CONFIG_FILE} is missing, so it cannot be "
                    f"resumed safely; restore {CONFIG_FILE} or use a new run directory"
                )
            return None
        existing, resolved = read_yaml(path), self.config.model_dump(mode="json")
        if changed := _changed_fields(_paths_masked(existing), _paths_masked(resolved)):
            raise ConfigError(
                f"{self.path} holds a run with a different config (fields {changed} differ); use a new run directory"
            )
        if manifest is None:  # a run from before manifests (or stopped right after writing its config)
            if changed := _changed_fields(existing, resolved):
                raise ConfigError(
                    f"{self.path} holds a run with a different config (fields {changed} differ) and no "
                    f"{MANIFEST_FILE} to tell whether they name the same files; use a new run directory"
                )
            return None
        if manifest.config_sha256 != self._digest:
            recorded = manifest.inputs
            if moved := [n for n in sorted({*recorded, *self._inputs}) if recorded.get(n) != self._inputs.get(n)]:
                named = ", ".join(f"{n} {_field(resolved, n)}" for n in moved)
                raise ConfigError(
                    f"{self.path}: {named} is not the file this run started from (its SHA-256 differs from "
                    f"{self.recorded_in}); use a new run directory"
                )
            raise ConfigError(
                f"{self.path}: {CONFIG_FILE} was changed after the run started (its hash differs from "
                f"{self.recorded_in}); restore it or use a new run directory"
            )
        return manifest

    def claim(self) -> None:
        """Write the resolved config (again, where only its input paths moved) and the manifest."""
        path, resolved = self.path / CONFIG_FILE, self.config.model_dump(mode="json")
        if not path.exists() or read_yaml(path) != resolved:
            with atomic_path(path) as tmp:
                tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        if self.manifest is None:
            self.manifest = RunManifest(self._digest, self._inputs)
            write_manifest(self.path, self.manifest)
        elif self._restore:
            write_manifest(self.path, self.manifest)
            self._restore = False

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def open_run_dir(run_dir: str | os.PathLike, config: StageConfig) -> RunDirectory:
    """Lock `run_dir` and check what it holds against `config`; `claim()` it once the rest is checked:
    `with open_run_dir(run_dir, config) as run: ...; run.claim(); train...` (the lock ends with the block)."""
    return RunDirectory(run_dir, config)


def _field(data: dict[str, Any], name: str) -> Any:
    for part in name.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _with_field(data: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    head, _, rest = name.partition(".")
    return {**data, head: _with_field(data.get(head) or {}, rest, value) if rest else value}


def _paths_masked(data: dict[str, Any]) -> dict[str, Any]:
    """The config with the paths of its input files blanked: they may move, their content may not."""
    for name in INPUT_FIELDS:
        if _field(data, name):
            data = _with_field(data, name, "<input file>")
    return data


def _changed_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
