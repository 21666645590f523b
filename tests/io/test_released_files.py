"""The paper's released files, as it saved them: a Lightning `.ckpt` whose `hyper_parameters` hold
pickled config objects and an argparse `Namespace`, a `defaultdict` Gram file, DeepSpeed and BEiT-3
wrappers. They are read without running code from the file, and a pickle whose payload would run
is refused with one line while the payload never runs."""

import argparse
import contextlib
import os
import pickle
import sys
import types
from collections import defaultdict

import pytest
import torch
from conftest import make_inputs
from paper_oracle import paper_regmean

from vlmerge.cli.main import main
from vlmerge.core.errors import CheckpointError
from vlmerge.io import safe_pickle
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.io.grams import open_grams
from vlmerge.io.layout import Layout, gram_key_to_reference, to_reference_key
from vlmerge.merging.grams import collect_grams
from vlmerge.models import VLTransformer, model_config

CONFIG_MODULE = "vilt.moe.config"  # where the paper's MOEConfig lives; no such package is installed here


@contextlib.contextmanager
def throwaway_module(name: str, **classes: type):
    """Register `name` (and its parents) in sys.modules while a file is saved, then remove them, so
    the saved file names classes that no import can find afterwards."""
    parts = name.split(".")
    packages = [".".join(parts[: i + 1]) for i in range(len(parts))]
    assert not any(p in sys.modules for p in packages)
    modules = {p: types.ModuleType(p) for p in packages}
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__, cls.__name__ = name, cls_name, cls_name
        setattr(modules[name], cls_name, cls)
    sys.modules.update(modules)
    try:
        yield
    finally:
        for p in packages:
            sys.modules.pop(p, None)


class MOEConfig:  # the shape of the paper's config object: plain attributes
    def __init__(self, **values):
        self.__dict__.update(values)


def reference_state(model: VLTransformer) -> dict[str, torch.Tensor]:
    extra = {"itm_score.fc.weight": torch.randn(2, 32)}  # a task head, passed through
    return {**{to_reference_key(k): v.clone() for k, v in model.state_dict().items()}, **extra}


def save_release(path, state, config=None, **extra):
    """A Lightning-style checkpoint: weights plus pickled hyper-parameters."""
    config = config if config is not None else MOEConfig(num_experts=3, loss_names={"irtr": 1}, lr=1e-4)
    hyper = {"config": config, "args": argparse.Namespace(seed=0, exp_name="vlmo_moe"), **extra}
    with throwaway_module(CONFIG_MODULE, MOEConfig=type(config)):
        torch.save({"state_dict": state, "hyper_parameters": hyper, "epoch": 3, "global_step": 120}, path)
    return path


@pytest.fixture
def release(tmp_path):
    """A simulated paper release: checkpoint, `defaultdict` Gram file, and what they hold."""
    torch.manual_seed(3)
    config = model_config("paper-micro")
    model = VLTransformer(config)
    inputs = make_inputs(config, seed=5)
    batches = [inputs, {"images": inputs["images"]}, {"text_ids": inputs["text_ids"], "text_mask": inputs["text_mask"]}]
    grams, _ = collect_grams(model, batches)
    state = reference_state(model)
    paper_grams = defaultdict(list, {gram_key_to_reference(k): g for k, g in grams.items()})
    torch.save(paper_grams, tmp_path / "grams.pth")
    return {
        "config": config,
        "ckpt": save_release(tmp_path / "epoch=3.ckpt", state),
        "grams": tmp_path / "grams.pth",
        "state": state,
        "paper_grams": dict(paper_grams),
    }


def test_plain_weights_only_loading_refuses_the_release(release):
    """Why the stand-ins exist: torch alone reads neither file."""
    for path in (release["ckpt"], release["grams"]):
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(path, weights_only=True)


def test_a_lightning_checkpoint_with_config_objects_loads_with_identical_weights(release):
    reader = open_checkpoint(release["ckpt"])
    assert reader.layout is Layout.REFERENCE
    stored = {reader._stored_key[k]: reader.get(k) for k in reader.keys}
    assert sorted(stored) == sorted(release["state"])
    for key, tensor in release["state"].items():
        assert torch.equal(stored[key], tensor), key
    assert "vilt" not in sys.modules  # the module the file names was never imported


def test_config_objects_become_inert_stand_ins_that_record_what_the_file_held(release):
    with open(release["ckpt"], "rb") as handle:
        loaded = safe_pickle.load_with_stand_ins(handle, safe_pickle.unsafe_globals(handle))
    config = loaded["hyper_parameters"]["config"]
    assert safe_pickle.is_stand_in(config) and config.qualified_name == "vilt.moe.config.MOEConfig"
    assert config.state == {"num_experts": 3, "loss_names": {"irtr": 1}, "lr": 1e-4}
    assert loaded["hyper_parameters"]["args"] == argparse.Namespace(seed=0, exp_name="vlmo_moe")
    assert loaded["epoch"] == 3 and "vilt" not in sys.modules


def test_a_defaultdict_gram_file_loads_with_identical_matrices(release):
    grams = open_grams(release["grams"])
    assert grams.reader.layout is Layout.REFERENCE
    assert len(grams.keys) == len(release["paper_grams"])
    for module, key in grams.keys.items():
        assert torch.equal(grams.get(module), release["paper_grams"][grams.reader._stored_key[key]]), module


def test_the_release_merges_with_regmean_through_the_cli_as_the_paper_does(release, tmp_path):
    out = tmp_path / "merged.pt"
    args = ["merge", release["ckpt"], "--method", "regmean", "--alpha", "0.8", "--grams", release["grams"]]
    args += ["--allow-foreign-grams", "--image-size", 32]  # its Gram file records no checkpoint; its table no size
    assert main([str(a) for a in [*args, "--layout", "reference", "--out", out, "--quiet"]]) == 0
    ours = torch.load(out, weights_only=True)
    config = release["config"]
    theirs = paper_regmean(
        release["state"],
        release["paper_grams"],
        num_layers=config.depth,
        fusion_layer=config.fusion_layer,
        alpha=0.8,
        task="all",
    )
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        torch.testing.assert_close(ours[key], expected.to(ours[key].dtype), rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("wrapper", ["deepspeed", "model", "model-with-args"])
def test_deepspeed_and_beit3_wrappers_load_with_identical_weights(release, tmp_path, wrapper):
    state = release["state"]
    if wrapper == "deepspeed":  # VLMo's DeepSpeed files: `module`, every key prefixed `module.`
        content = {"module": {f"module.{k}": v for k, v in state.items()}, "global_steps": 7}
    elif wrapper == "model":
        content = {"model": state}
    else:  # BEiT-3's released files: `model` and an argparse `args`
        content = {"model": state, "args": argparse.Namespace(model="beit3_base_patch16_224", drop_path=0.1)}
    torch.save(content, tmp_path / "released.pth")
    reader = open_checkpoint(tmp_path / "released.pth")
    stored = {reader._stored_key[k]: reader.get(k) for k in reader.keys}
    assert sorted(stored) == sorted(state)
    assert all(torch.equal(stored[k], v) for k, v in state.items())


# Payloads ------------------------------------------------------------------------------------


class EvalPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class SystemPayload(EvalPayload):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ListPayload(EvalPayload):  # a harmless builtin, still a call the file asks for: refused
    def __reduce__(self):
        return (list, ((str(self.marker),),))


PAYLOADS = {"eval": EvalPayload, "os.system": SystemPayload}
PLACES = {
    "top level": lambda state, payload: {"state_dict": state, "callback": payload},
    "hyper_parameters": lambda state, payload: {"state_dict": state, "hyper_parameters": {"x": payload}},
    "argparse args": lambda state, payload: {"model": state, "args": argparse.Namespace(hook=payload)},
    "gram defaultdict factory": lambda state, payload: defaultdict(eval, state),
}


def save_payload(path, content, with_config):
    if with_config:  # also name a config class, so the file is not refused for that alone
        content = {**content, "config": MOEConfig(n=1)} if type(content) is dict else content
        with throwaway_module(CONFIG_MODULE, MOEConfig=MOEConfig):
            torch.save(content, path)
    else:
        torch.save(content, path)


@pytest.mark.parametrize("with_config", [False, True], ids=["alone", "beside-a-config"])
@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_a_pickle_whose_payload_would_run_is_refused_in_one_line_and_never_runs(
    release, tmp_path, capsys, payload, place, with_config
):
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "released.ckpt"
    save_payload(bad, PLACES[place](release["state"], PAYLOADS[payload](marker)), with_config)
    out = tmp_path / "merged.pt"
    assert main(["merge", str(bad), "--method", "interpolation", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    refused = "builtins.eval" if payload == "eval" or "factory" in place else "posix.system"
    assert len(err) == 1 and "needs code to load" in err[0] and refused in err[0], err
    assert not marker.exists() and not out.exists()


def test_a_payload_inside_a_config_objects_state_is_refused(release, tmp_path):
    marker = tmp_path / "payload-ran"
    bad = save_release(tmp_path / "bad.ckpt", release["state"], MOEConfig(n=1, hook=SystemPayload(marker)))
    with pytest.raises(CheckpointError, match="'posix.system'") as error:
        open_checkpoint(bad)
    assert "\n" not in str(error.value) and not marker.exists()


def test_a_call_to_a_harmless_builtin_is_refused_too(release, tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": release["state"], "x": ListPayload(marker)}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="needs code to load") as error:
        open_checkpoint(tmp_path / "bad.ckpt")
    assert "builtins.list" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name",
    [
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "builtins.__import__",
        "posix.system",
        "nt.system",
        "os.system",
        "subprocess.Popen",
        "subprocess.check_output",
        "runpy._run_code",
        "importlib.import_module",
        "pickle.loads",
        "copyreg._reconstructor",
        "functools.partial",
        "torch.load",
        "torch.nn.modules.linear.Linear",
        "numpy.core.multiarray._reconstruct",
        "vilt.moe.config.build_config",  # a function of a config module
        "vilt.moe.config.MOEConfig.__init__",
        "MOEConfig",  # no module
        "vilt.moe.con fig.MOEConfig",
    ],
)
def test_the_rule_refuses_functions_and_system_names(name):
    with pytest.raises(safe_pickle.RefusedGlobal):
        safe_pickle.classify(name)


@pytest.mark.parametrize(
    "name", ["vilt.moe.config.MOEConfig", "vlmo.config.Config", "pytorch_lightning.utilities.parsing.AttributeDict"]
)
def test_the_rule_stands_in_config_classes_without_importing_them(name):
    stand_in = safe_pickle.classify(name)
    assert issubclass(stand_in, safe_pickle.StandIn) and stand_in.qualified_name == name
    instance = stand_in(1, 2)
    assert instance.args == (1, 2) and instance.state is None
    with pytest.raises(TypeError):
        pickle.dumps(instance)  # a stand-in is never written back as the real class
    assert name.split(".")[0] not in sys.modules
