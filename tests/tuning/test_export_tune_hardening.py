"""`vlmerge export-hf`, `vlmerge tune`, coefficient specs and output paths under hostile input.

Every refusal goes through the CLI (`refused`): exit status 2, exactly one stderr line naming the
problem, nothing at the destination (not even a temporary), every input byte for byte as it was. A
run killed with SIGKILL leaves its temporary behind (nothing runs in a killed process); the next run
of the same command to the same output removes it, since the process named in its name is gone.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from toy_captions import ToyCaptions

from vlmerge import tuning
from vlmerge.cli.main import main
from vlmerge.core.errors import ConfigError
from vlmerge.data.sources import SOURCES
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.atomic import remove_stale_temporaries
from vlmerge.io.checkpoint import file_sha256, open_checkpoint, save_checkpoint
from vlmerge.merging import MERGE_METHODS
from vlmerge.merging.coefficients import MAX_DEPTH, parse_spec
from vlmerge.models import VLTransformer, model_config, save_model
from vlmerge.models.heads import PretrainingHeads
from vlmerge.training.pretrain import HEADS
from vlmerge.tuning import MAX_CANDIDATES, GridAxis

IMAGE_SIZE = 16
SIZES = {"train": 16, "val": 8, "test": 4}
WORDS = ("red", "blue", "green", "round", "square", "small", "large", "dark")
HANG_S = 300  # a child stopped where a temporary exists waits this long for its SIGKILL
TIMEOUT_S = 120


class ToySource(ToyCaptions):
    name = "hardening_toy"
    sizes = SIZES
    words = WORDS
    optional_path_keys = ("notes",)  # named, never read: a data file the output must not overwrite


@pytest.fixture(scope="module", autouse=True)
def toy_source():
    with ToySource.registered():
        yield


@pytest.fixture(scope="module")
def tune_files(tmp_path_factory):
    """A modality-specific micro checkpoint with a tokenizer and pre-training heads, and its seed."""
    root = tmp_path_factory.mktemp("tune")
    tokenizer = TextTokenizer.train([" ".join(WORDS)], vocab_size=40, max_len=8)
    config = model_config("micro", image_size=IMAGE_SIZE, vocab_size=tokenizer.vocab_size, max_text_len=8)
    torch.manual_seed(0)
    specific, seed = VLTransformer(config), VLTransformer(config.agnostic())
    heads = {HEADS: PretrainingHeads(config.width, tokenizer.vocab_size)}
    metadata = {"tokenizer": tokenizer.to_json()}
    return {
        "source": save_model(specific, root / "specific.safetensors", extra_metadata=metadata, heads=heads),
        "seed": save_model(seed, root / "seed.safetensors", extra_metadata=metadata, heads=heads),
    }


def merged_model(tmp_path: Path, name: str = "merged.safetensors", change=None) -> Path:
    """A modality-agnostic micro checkpoint, each weight off its init; `change(state)` edits it in place."""
    torch.manual_seed(0)
    model = VLTransformer(model_config("micro", layer_scale_init=1.0).agnostic())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
        if change is not None:
            change(dict(model.named_parameters()))
    return save_model(model, tmp_path / name)


def cli(*args) -> int:
    return main([str(a) for a in args])


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp")) if out.parent.is_dir() else []


def refused(capsys, args, message: str, inputs, out) -> str:
    """Run the CLI; assert exit 2, one stderr line containing `message`, nothing at `out` (not even a
    temporary), the inputs byte for byte as they were."""
    out = Path(out)
    before = {Path(path): Path(path).read_bytes() for path in inputs}
    capsys.readouterr()
    code = cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], (code, err)
    assert out in before or not out.exists()
    assert temporaries(out) == []
    assert {path: path.read_bytes() for path in before} == before
    return err[0]


def tune_args(files, out, *extra, method: str = "arithmetic") -> list:
    return ["tune", files["source"], "--method", method, "--seed-checkpoint", files["seed"], "--out", out, *extra]


# ----------------------------------------------------------------------------- export-hf: one opening
def test_export_hf_reads_weights_and_hash_from_one_opening(tmp_path, capsys, monkeypatch):
    from vlmerge.export import huggingface

    source = merged_model(tmp_path)
    other = merged_model(tmp_path, "other.safetensors", change=lambda p: p["norm.bias"].add_(1.0))
    read_config = huggingface.checkpoint_config

    def then_replace(reader, *args, **kwargs):  # the path names another file once the input is open
        config = read_config(reader, *args, **kwargs)
        os.replace(other, source)
        return config

    monkeypatch.setattr(huggingface, "checkpoint_config", then_replace)
    out = tmp_path / "hf"
    refused(capsys, ["export-hf", source, "--out", out], "replaced by another file while it was being read", [], out)


def test_export_hf_records_the_hash_of_the_file_it_exported(tmp_path, capsys):
    source = merged_model(tmp_path)
    assert cli("export-hf", source, "--out", tmp_path / "hf") == 0
    assert f"sha256 `{file_sha256(source)}`" in (tmp_path / "hf" / "README.md").read_text()


# ----------------------------------------------------------------------------- export-hf: not finite
def huge_cls_token(params: dict) -> None:
    params["cls_token"].fill_(3e38)  # finite in float32; the final LayerNorm's variance of it is not


def huge_layer_scale(params: dict) -> None:
    params["blocks.0.gamma_1"].fill_(1e20)  # folded into the attention output: 1e20 * 1e20 > float32's max
    params["blocks.0.attn.proj.weight"].fill_(1e20)


def test_export_hf_refuses_features_that_are_not_finite(tmp_path, capsys):
    source = merged_model(tmp_path, change=huge_cls_token)
    out = tmp_path / "hf"
    line = refused(capsys, ["export-hf", source, "--out", out], "not finite", [source], out)
    assert "not written" in line


@pytest.mark.parametrize("verify", [[], ["--no-verify"]])
def test_export_hf_refuses_weights_that_overflow_float32(tmp_path, capsys, verify):
    source = merged_model(tmp_path, change=huge_layer_scale)
    out = tmp_path / "hf"
    refused(capsys, ["export-hf", source, "--out", out, *verify], "not finite in float32", [source], out)


# ----------------------------------------------------------------------------- SIGKILL litter
RUNNER = """
import sys
sys.path[:0] = [{tests!r}, {helpers!r}]
import test_export_tune_hardening as here
here.prepare_child(sys.argv[1])
from vlmerge.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def prepare_child(point: str) -> None:
    """In a child process: the toy data, and a hang at `point` while a temporary exists, to be killed there."""
    SOURCES.add(ToySource.name, ToySource)

    def hang(*_args, **_kwargs):
        time.sleep(HANG_S)

    if point == "probe":  # the candidate checkpoint is written; its probe would run now
        tuning.scorers.run_finetune = hang
    else:  # the exported folder is written; it would be renamed into place now
        from transformers import ViTModel

        save = ViTModel.save_pretrained

        def save_then_hang(self, folder, **kwargs):
            save(self, folder, **kwargs)
            hang()

        ViTModel.save_pretrained = save_then_hang


def killed_with_a_temporary(point: str, argv: list, out: Path, holds: str) -> Path:
    """Run the CLI in a child, SIGKILL it once a temporary beside `out` holds the file `holds`; that temporary."""
    command = [
        sys.executable,
        "-c",
        RUNNER.format(tests=str(Path(__file__).parent), helpers=str(Path(__file__).parents[1])),
        point,
        *map(str, argv),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (found := [tmp for tmp in temporaries(out) if (tmp / holds).is_file()]):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no temporary holding {holds} beside {out}: {process.communicate()[1].decode()[-2000:]}")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert found[0].name.startswith(f".{out.name}.{process.pid}-")  # named after its destination and owner
    return found[0]


def test_sigkill_mid_probe_leaves_a_candidate_folder_the_next_tune_removes(tune_files, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    probe = ["--objective", "probe", "--task", "classify_image", "--probe-steps", "1", "--probe-batch-size", "4"]
    argv = tune_args(tune_files, out, "--grid", "lam=0.5,1.0", "--data", ToySource.name, "--quiet", *probe)
    stale = killed_with_a_temporary("probe", argv, out, holds="candidate.safetensors")
    assert not out.exists() and stale.is_dir()
    assert cli(*argv) == 0
    assert out.is_file() and temporaries(out) == [] and sorted(tmp_path.iterdir()) == [out]


def test_sigkill_mid_export_leaves_a_folder_the_next_export_removes(tmp_path, capsys):
    source = merged_model(tmp_path)
    out = tmp_path / "hf"
    stale = killed_with_a_temporary("export", ["export-hf", source, "--out", out], out, holds="config.json")
    assert not out.exists() and stale.is_dir()
    assert cli("export-hf", source, "--out", out) == 0
    assert (out / "model.safetensors").is_file() and temporaries(out) == []
    assert sorted(tmp_path.iterdir()) == [out, source]


def test_only_temporaries_of_processes_gone_are_removed(tmp_path):
    out = tmp_path / "best.safetensors"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        names = {
            "gone": f".{out.name}.{gone.pid}-0123abcd.tmp",
            "alive": f".{out.name}.{alive.pid}-0123abcd.tmp",
            "mine": f".{out.name}.{os.getpid()}-0123abcd.tmp",
            "other output": f".other.safetensors.{gone.pid}-0123abcd.tmp",
            "not ours": f".{out.name}.notes.tmp",
        }
        (tmp_path / names["gone"]).mkdir()
        (tmp_path / names["gone"] / "candidate.safetensors").write_bytes(b"x")
        for key in ("alive", "mine", "other output", "not ours"):
            (tmp_path / names[key]).write_bytes(b"x")
        assert [p.name for p in remove_stale_temporaries(out)] == [names["gone"]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "gone")
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- output paths with ..
def test_dot_dot_in_an_output_path_creates_no_directory_it_leaves(tune_files, tmp_path, capsys):
    source = merged_model(tmp_path)
    assert cli("export-hf", source, "--out", tmp_path / "a" / "sub" / ".." / "hf") == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["hf"]
    out = tmp_path / "b" / "sub" / ".." / "best.safetensors"
    assert cli(*tune_args(tune_files, out, "--grid", "lam=0.5,1.0", "--data", ToySource.name, "--quiet")) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["best.safetensors"]
    save_checkpoint(tmp_path / "c" / "sub" / ".." / "m.safetensors", {"w": torch.ones(2)})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["m.safetensors"]


def test_a_failed_write_removes_the_directories_it_created(tmp_path, capsys, monkeypatch):
    from transformers import ViTModel

    def full_disk(self, folder, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ViTModel, "save_pretrained", full_disk)
    source = merged_model(tmp_path)
    out = tmp_path / "new" / "dirs" / "hf"
    refused(capsys, ["export-hf", source, "--out", out], "No space left", [source], out)
    assert sorted(tmp_path.iterdir()) == [source]


# ----------------------------------------------------------------------------- specs: one line, no traceback
def nested(depth: int, leaf=0.5) -> dict:
    spec = leaf
    for _ in range(depth):
        spec = {"default": spec}
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (nested(500), f"nested more than {MAX_DEPTH} deep"),
        ([0, 10**400], "an integer of 401 digits, beyond the range of a float"),
        ({"attn": 10**400, "default": 0.5}, "an integer of 401 digits, beyond the range of a float"),
        (nested(3, [0.2, 10**400]), "beyond the range of a float"),
    ],
    ids=["500 deep", "big int in a gradient", "big int by role", "big int deep"],
)
def test_a_hostile_spec_is_one_line(tune_files, tmp_path, capsys, spec, message):
    out = tmp_path / "best.safetensors"
    searched = ["--grid", "density=0.5,1.0", "--data", ToySource.name]  # lam fixed as a spec, density searched
    args = tune_args(tune_files, out, "--option", f"lam={json.dumps(spec)}", *searched, method="ties")
    refused(capsys, args, message, [tune_files["source"], tune_files["seed"]], out)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[" * 30_000 + "]" * 30_000, "nested too deep to be a coefficient spec"), ("[" + "9" * 5000 + "]", "not a JSON")],
    ids=["30000 deep", "5000 digits"],
)
def test_option_text_json_cannot_break_the_parser(tune_files, tmp_path, capsys, text, message):
    """The JSON parser itself recurses and converts integers: its limits are one line too."""
    out = tmp_path / "merged.safetensors"
    args = ["merge", tune_files["source"], "--method", "interpolation", "--ratio", text, "--out", out]
    refused(capsys, args, message, [tune_files["source"]], out)


def test_specs_as_deep_as_meaningful_still_parse():
    method = MERGE_METHODS.get("ties")
    spec = {"default": {"attn": {"default": [0.2, 0.8]}, "default": 1.0}}
    assert parse_spec(spec, "lam", method).given() == spec
    with pytest.raises(ConfigError, match="nested more than"):
        parse_spec(nested(MAX_DEPTH + 1), "lam", method)


# ----------------------------------------------------------------------------- grids: bounded before built
@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([f"lam=0:1:{10**400}"], f"a COUNT above {MAX_CANDIDATES}"),
        (["lam=0:1:100000000"], f"a COUNT above {MAX_CANDIDATES}"),
        (["lam=0:1:1000000"], f"a COUNT above {MAX_CANDIDATES}"),
        (["lam=0:1:101", "density=0.01:1:100"], "the grid has 10100 candidates (101 x 100); tune scores at most"),
        (["lam=" + ",".join(str(i) for i in range(MAX_CANDIDATES + 1))], f"more than {MAX_CANDIDATES} values"),
        (["lam=-1e308:1e308:3"], "overflows a float"),
    ],
    ids=["400-digit count", "count 1e8", "count 1e6", "product", "long list", "too wide"],
)
def test_a_grid_too_big_is_one_line_at_once(tune_files, tmp_path, capsys, grid, message):
    out = tmp_path / "best.safetensors"
    args = tune_args(tune_files, out, "--data", ToySource.name, method="ties")
    for axis in grid:
        args += ["--grid", axis]
    started = time.monotonic()
    refused(capsys, args, message, [tune_files["source"]], out)
    assert time.monotonic() - started < 10


def test_an_integer_range_is_exact_at_any_size():
    big = 10**400
    assert GridAxis.parse(f"random-seed={big}:{big + 6}:4", "dare").values == (big, big + 2, big + 4, big + 6)
    with pytest.raises(ConfigError, match="not all integers"):
        GridAxis.parse(f"random-seed=0:{big + 1}:3", "dare")


# ----------------------------------------------------------------------------- tune never overwrites an input
def test_tune_refuses_to_overwrite_its_data_config(tune_files, tmp_path, capsys):
    data = tmp_path / "data.yaml"
    data.write_text(f"dataset: {ToySource.name}\nimage_size: {IMAGE_SIZE}\n")
    args = tune_args(tune_files, data, "--grid", "lam=0.5,1.0", "--data", data)
    refused(capsys, args, "is the input", [data, tune_files["source"], tune_files["seed"]], data)


def test_tune_refuses_to_overwrite_a_file_its_data_names(tune_files, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("the data's own file")
    data = tmp_path / "data.yaml"
    data.write_text(f"dataset: {ToySource.name}\nimage_size: {IMAGE_SIZE}\npaths:\n  notes: {notes}\n")
    args = tune_args(tune_files, tmp_path / "sub" / ".." / "notes.txt", "--grid", "lam=0.5,1.0", "--data", data)
    refused(capsys, args, "is the input", [notes, data], notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.yaml", "notes.txt"]


@pytest.mark.parametrize("name", ["source", "seed"])
def test_tune_refuses_to_overwrite_a_checkpoint(tune_files, tmp_path, capsys, name):
    out = tune_files[name]
    refused(
        capsys,
        tune_args(tune_files, out, "--grid", "lam=0.5,1.0", "--data", ToySource.name),
        "is the input",
        [out],
        out,
    )
    assert open_checkpoint(out).config is not None
