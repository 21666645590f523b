"""Issue 15, the merge and Gram layer: no input gives a wrong result with exit status 0.

Every refusal is driven through the CLI and checked one way (`refused`): exit status 2, exactly one
line on stderr naming the problem, no file at the destination, every input byte for byte as it
was, and no expert tensor read or output written before the refusal (the checks come first).
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_inputs

import vlmerge.merging.engine as engine
import vlmerge.merging.prepared_merge as prepared_merge
import vlmerge.merging.provenance as provenance
import vlmerge.training.grams as training_grams
from vlmerge.cli.main import main
from vlmerge.data.tokenizer import RESERVED_TOKENS, TextTokenizer
from vlmerge.io.checkpoint import file_sha256, open_checkpoint, save_checkpoint
from vlmerge.io.grams import open_grams, save_grams
from vlmerge.merging import MERGE_METHODS, build_merge_plan, merge_checkpoint, register_method, unregister_method
from vlmerge.merging.grams import collect_grams
from vlmerge.merging.methods import InterpolationOptions
from vlmerge.models import VLTransformer, model_config, save_model

MODULE = "blocks.1.mlp.l.fc1"  # a Gram matrix every regmean merge of the micro model needs


@pytest.fixture
def files(specific_model, tmp_path):
    """A micro modality-specific checkpoint, its seed, and its Gram file recording its hash."""
    seed = VLTransformer(specific_model.config.agnostic())
    inputs = make_inputs(specific_model.config)
    text = {"text_ids": inputs["text_ids"], "text_mask": inputs["text_mask"]}
    grams, info = collect_grams(specific_model, [inputs, {"images": inputs["images"]}, text])
    source = save_model(specific_model, tmp_path / "specific.safetensors")
    provenance = {"checkpoint": {"path": str(source), "sha256": file_sha256(source)}}
    return {
        "source": source,
        "seed": save_model(seed, tmp_path / "seed.safetensors"),
        "grams": save_grams(tmp_path / "grams.safetensors", grams, info, provenance),
        "out": tmp_path / "out" / "merged.safetensors",
    }


def cli(*args) -> int:
    return main([str(a) for a in args])


def forbid(*_args, **_kwargs):
    raise AssertionError("a tensor was read, or an output written, before the inputs were checked")


def refused(monkeypatch, capsys, args, message, inputs, out) -> str:
    """Run the CLI; assert exit 2, one stderr line containing `message`, nothing written, inputs unchanged
    (and `out`, where it already was a file or a directory, as it was)."""
    out = Path(out)
    before = {Path(path): Path(path).read_bytes() for path in [*inputs, *([out] if out.is_file() else [])]}
    listing = sorted(out.iterdir()) if out.is_dir() else None
    capsys.readouterr()
    with monkeypatch.context() as patch:  # the checks come before any expert tensor is read or output written
        for owner, name in [
            (prepared_merge, "_read_finite"),
            (engine, "stream_safetensors"),
            (engine, "save_checkpoint"),
            (training_grams, "load_pairs"),
            (training_grams, "collect_grams"),
        ]:
            patch.setattr(owner, name, forbid)
        code = cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], (code, err)
    if listing is not None:
        assert sorted(out.iterdir()) == listing
    elif out not in before:
        assert not out.exists()
    if out.parent.is_dir():
        assert not list(out.parent.glob(f".{out.name}.*.tmp"))  # not even a temporary
    assert {path: path.read_bytes() for path in before} == before
    return err[0]


def regram(files, tmp_path, name, change=None, info=None, provenance=None) -> Path:
    """The fixture's Gram file with each matrix replaced by `change(key, matrix)`, and its per-matrix
    info or its provenance replaced where given."""
    grams = open_grams(files["grams"])
    matrices = {key: grams.get(key) for key in grams.keys}
    if change is not None:
        matrices = {key: change(key, matrix) for key, matrix in matrices.items()}
    return save_grams(
        tmp_path / name,
        matrices,
        grams.info if info is None else info,
        grams.provenance if provenance is None else provenance,
    )


def regmean_args(files, grams, *extra):
    return ["merge", files["source"], "--method", "regmean", "--grams", grams, "--out", files["out"], "--quiet", *extra]


def linear_groups(source):
    reader = open_checkpoint(source)
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys})
    return reader, [g for g in plan.groups if g.is_linear_weight and len(g.experts) > 1]


# ----------------------------------------------------------------------------- 1. Gram files
def test_a_gram_file_of_another_checkpoint_is_refused_unless_allowed(files, tmp_path, monkeypatch, capsys):
    other = "ab" * 32
    foreign = regram(files, tmp_path, "foreign.safetensors", provenance={"checkpoint": {"path": "x", "sha256": other}})
    args = regmean_args(files, foreign)
    line = refused(monkeypatch, capsys, args, f"(sha256 {other})", [files["source"], foreign], files["out"])
    assert f"(sha256 {file_sha256(files['source'])})" in line and "--allow-foreign-grams" in line

    assert cli(*args, "--allow-foreign-grams") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: Gram file")]
    assert len(warned) == 1 and other in warned[0] and "used anyway" in warned[0]
    own = merge_checkpoint(files["source"], "regmean", grams=files["grams"], out=tmp_path / "own.safetensors")
    assert not any("Gram file" in note for note in own.warnings)  # the fixture's Gram file records the source
    merged = open_checkpoint(files["out"])
    recorded = provenance.metadata_warnings([warned[0].removeprefix("warning: "), *own.warnings])  # repeats collapsed
    assert json.loads(merged.metadata["merge"])["warnings"] == recorded
    expected = open_checkpoint(own.path)
    assert all(torch.equal(merged.get(key), expected.get(key)) for key in expected.keys)


def symmetric_shift(matrix: torch.Tensor, fraction: float) -> torch.Tensor:
    return matrix - fraction * torch.linalg.eigvalsh(matrix)[-1] * torch.eye(len(matrix), dtype=matrix.dtype)


GRAM_FAULTS = {  # what is done to matrix MODULE -> the error's words
    "asymmetric": (lambda g: g + 4 * g.triu(1), f"Gram matrix {MODULE} is not symmetric"),  # upper triangle x5
    "negative-definite": (
        lambda g: -symmetric_shift(g, -0.1),
        f"Gram matrix {MODULE} is not positive semi-definite: it is negative definite",
    ),
    "indefinite": (
        lambda g: symmetric_shift(g, 0.5),
        f"Gram matrix {MODULE} is not positive semi-definite: it is indefinite",
    ),
    "nan": (lambda g: with_nan(g), f"Gram matrix {MODULE} contains NaN or Inf"),
}


def with_nan(matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.clone()
    matrix[0, 1] = float("nan")
    return matrix


@pytest.mark.parametrize("fault", list(GRAM_FAULTS))
def test_a_matrix_that_is_no_gram_matrix_is_a_named_error_before_the_merge(files, tmp_path, monkeypatch, capsys, fault):
    change, message = GRAM_FAULTS[fault]
    bad = regram(files, tmp_path, "bad.safetensors", lambda key, g: change(g) if key == MODULE else g)
    refused(monkeypatch, capsys, regmean_args(files, bad), message, [files["source"], bad], files["out"])


@pytest.mark.parametrize(
    "tokens, message",
    [(0, f"Gram matrix {MODULE} records 0 tokens but is not zero"), (-5, f"{MODULE} records token count -5")],
)
def test_a_token_count_that_contradicts_the_matrix_is_a_named_error(
    files, tmp_path, monkeypatch, capsys, tokens, message
):
    info = {key: dict(value) for key, value in open_grams(files["grams"]).info.items()}
    info[MODULE]["tokens"] = tokens
    bad = regram(files, tmp_path, "bad.safetensors", info=info)
    refused(monkeypatch, capsys, regmean_args(files, bad), message, [files["source"], bad], files["out"])


@pytest.mark.parametrize("zeroed", ["all", "vl"])
def test_an_all_zero_gram_matrix_falls_back_to_the_plain_average_with_a_warning(files, tmp_path, capsys, zeroed):
    """Today's RegMean solved with them: all zero gave exact zeros for every merged linear weight."""
    hit = (lambda key: True) if zeroed == "all" else (lambda key: ".vl." in key)
    info = {
        key: {**value, "tokens": 0} if hit(key) else value for key, value in open_grams(files["grams"]).info.items()
    }
    zero = regram(files, tmp_path, "zero.safetensors", lambda key, g: torch.zeros_like(g) if hit(key) else g, info)
    assert cli(*regmean_args(files, zero)) == 0
    warned = sorted(line for line in capsys.readouterr().err.splitlines() if "all zero" in line)
    reader, groups = linear_groups(files["source"])
    fallen = [g for g in groups if any(hit(module) for module in g.gram_keys().values())]
    assert fallen and (zeroed == "all") == (len(fallen) == len(groups))
    assert warned == sorted(
        f"warning: {g.target}: Gram matrix of expert(s) {[m.value for m, k in g.gram_keys().items() if hit(k)]} "
        "is all zero (no tokens); using the plain average"
        for g in fallen
    )
    merged = open_checkpoint(files["out"])
    for group in fallen:
        experts = [reader.get(e.key) for e in group.experts.values()]
        assert torch.equal(merged.get(group.target), sum(experts) / len(experts)), group.target
        assert merged.get(group.target).abs().max() > 0


# ----------------------------------------------------------------------------- 2. --out
@pytest.mark.parametrize("role", ["source", "seed", "grams", "hard-link", "symlink"])
def test_out_naming_an_input_is_refused_before_any_work(files, tmp_path, monkeypatch, capsys, role):
    method = {"seed": "arithmetic", "grams": "regmean"}.get(role, "interpolation")
    out = files[role] if role in ("source", "seed", "grams") else tmp_path / f"{role}.safetensors"
    if role == "hard-link":
        os.link(files["source"], out)
    elif role == "symlink":
        out.symlink_to(files["source"])
    args = ["merge", files["source"], "--method", method, "--seed-checkpoint", files["seed"]]
    args += ["--grams", files["grams"], "--out", out, "--quiet"]
    inputs = [files["source"], files["seed"], files["grams"]]
    refused(monkeypatch, capsys, args, "writing it would overwrite that input", inputs, out)


@pytest.mark.parametrize("kind, message", [("directory", "is a directory"), ("empty", "the output path is empty")])
def test_out_that_is_a_directory_or_empty_is_refused_before_the_merge(
    files, tmp_path, monkeypatch, capsys, kind, message
):
    out = tmp_path / "a-directory" if kind == "directory" else ""
    if kind == "directory":
        out.mkdir()
    args = ["merge", files["source"], "--method", "interpolation", "--out", out, "--quiet"]
    refused(monkeypatch, capsys, args, message, [files["source"]], out or tmp_path / "nothing")


@pytest.mark.parametrize("kind", ["checkpoint", "directory"])
def test_grams_out_naming_its_checkpoint_or_a_directory_is_refused_before_the_pass(
    files, tmp_path, monkeypatch, capsys, kind
):
    out = files["source"] if kind == "checkpoint" else tmp_path
    message = "writing it would overwrite that input" if kind == "checkpoint" else "is a directory"
    args = ["grams", files["source"], "--limit", "4", "--out", out, "--quiet"]
    refused(monkeypatch, capsys, args, message, [files["source"]], out)


# ----------------------------------------------------------------------------- 3. dtypes
def test_experts_of_different_dtypes_are_a_named_error(files, tmp_path, monkeypatch, capsys):
    source = open_checkpoint(files["source"])
    state = source.state_dict()
    state["blocks.0.mlp.v.fc1.weight"] = state["blocks.0.mlp.v.fc1.weight"].half()
    bad = save_checkpoint(tmp_path / "mixed.safetensors", state, source.metadata)
    args = ["merge", bad, "--method", "interpolation", "--out", files["out"], "--quiet"]
    message = "experts of blocks.0.mlp.fc1.weight differ in dtype: v float16, l float32"
    refused(monkeypatch, capsys, args, message, [bad], files["out"])


# ----------------------------------------------------------------------------- 4. a source replaced mid-merge
@pytest.fixture
def swapping_method():
    """Interpolation that, on its first tensor, renames another checkpoint over the source (as a
    training run writes its next checkpoint): the rest of the merge runs against a replaced path."""
    swaps: list[tuple[Path, Path]] = []

    def swap_then_interpolate(inputs, options):
        while swaps:
            os.replace(*swaps.pop())
        return MERGE_METHODS.get("interpolation").fn(inputs, options)

    register_method("swap_then_interpolate", InterpolationOptions)(swap_then_interpolate)
    yield swaps
    unregister_method("swap_then_interpolate")


def test_a_source_replaced_mid_merge_gives_the_old_files_merge_and_hash(files, tmp_path, swapping_method, capsys):
    expected = merge_checkpoint(files["source"], "interpolation", out=tmp_path / "expected.safetensors")
    old_sha = file_sha256(files["source"])
    torch.manual_seed(1)
    newer = save_model(VLTransformer(model_config("micro", layer_scale_init=1.0)), tmp_path / "newer.safetensors")
    new_bytes = newer.read_bytes()
    swapping_method.append((newer, files["source"]))
    args = ["merge", files["source"], "--method", "swap_then_interpolate", "--out", files["out"], "--quiet"]
    assert cli(*args) == 0
    assert files["source"].read_bytes() == new_bytes  # the swap did happen, mid-merge
    merged, old = open_checkpoint(files["out"]), open_checkpoint(expected.path)
    assert merged.keys == old.keys
    different = [key for key in old.keys if not torch.equal(merged.get(key), old.get(key))]
    assert different == []
    assert json.loads(merged.metadata["merge"])["inputs"]["source"]["sha256"] == old_sha


# ----------------------------------------------------------------------------- 5. tokenizer metadata
@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "metadata 'tokenizer' is not valid JSON"),  # refused when the file is opened
        ('{"not": "a tokenizer"}', "metadata 'tokenizer' is not a serialised tokenizer"),
        ('{"model": {"type": "WordPiece"}}', "metadata 'tokenizer' is not a serialised tokenizer"),
    ],
)
def test_a_tokenizer_in_the_metadata_that_is_not_one_is_refused(files, tmp_path, monkeypatch, capsys, text, message):
    source = open_checkpoint(files["source"])
    bad = save_checkpoint(tmp_path / "bad.safetensors", source.state_dict(), {**source.metadata, "tokenizer": text})
    args = ["merge", bad, "--method", "interpolation", "--out", files["out"], "--quiet"]
    refused(monkeypatch, capsys, args, message, [bad], files["out"])


def test_a_valid_tokenizer_is_carried_into_the_merge(files, tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join([*RESERVED_TOKENS, "a", "cat"]) + "\n")
    tokenizer = TextTokenizer.from_vocab(tmp_path / "vocab.txt").to_json()
    source = open_checkpoint(files["source"])
    good = save_checkpoint(
        tmp_path / "good.safetensors", source.state_dict(), {**source.metadata, "tokenizer": tokenizer}
    )
    merge_checkpoint(good, "interpolation", out=files["out"])
    assert open_checkpoint(files["out"]).metadata["tokenizer"] == tokenizer


# ----------------------------------------------------------------------------- 6. same merge, same bytes
def test_the_same_merge_gives_the_same_bytes_in_this_process_and_another(files, tmp_path):
    outs = [tmp_path / f"merged-{i}.safetensors" for i in range(3)]
    for out in outs[:2]:
        merge_checkpoint(files["source"], "regmean", grams=files["grams"], out=out)
    command = [sys.executable, "-m", "vlmerge", "merge", str(files["source"]), "--method", "regmean"]
    command += ["--grams", str(files["grams"]), "--out", str(outs[2]), "--quiet"]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, capture_output=True, timeout=120, env=env)
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    raw = outs[0].read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


# ----------------------------------------------------------------------------- 7. SIGKILL of `vlmerge grams`
def test_sigkill_mid_gram_pass_leaves_no_gram_file(emoji_sources, tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join([*RESERVED_TOKENS, "a", "face", "smiling", "cat"]) + "\n")
    tokenizer = TextTokenizer.from_vocab(tmp_path / "vocab.txt")
    torch.manual_seed(0)
    model = VLTransformer(model_config("micro", vocab_size=tokenizer.vocab_size))
    checkpoint = save_model(model, tmp_path / "specific.safetensors", extra_metadata={"tokenizer": tokenizer.to_json()})
    sha = file_sha256(checkpoint)
    out = tmp_path / "grams" / "grams.safetensors"
    out.parent.mkdir()
    command = [sys.executable, "-m", "vlmerge", "grams", str(checkpoint), "--limit", "400", "--batch-size", "1"]
    command += ["--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = threading.Event()
    seen = bytearray()

    def watch() -> None:  # the progress bar `grams: ...` appears once the pass has begun
        while chunk := process.stderr.read1(4096):
            seen.extend(chunk)
            if b"grams:" in seen:
                started.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert started.wait(timeout=120), seen.decode(errors="replace")[-2000:]
        process.send_signal(signal.SIGSTOP)
        assert process.poll() is None, "the Gram pass finished before it could be stopped; give it more data"
        assert not out.exists()  # frozen mid-pass: nothing at the destination
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    watcher.join(timeout=10)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    assert all(p.name.startswith(f".{out.name}.") and p.suffix == ".tmp" for p in out.parent.iterdir())
    assert file_sha256(checkpoint) == sha
