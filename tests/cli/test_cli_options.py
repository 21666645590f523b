"""The merge request is declared once: its fields are the flags of `vlmerge merge` and `vlmerge tune`,
and the command line and Python build the same object."""

import argparse

import pytest
from pydantic import Field, ValidationError

from vlmerge.cli import options
from vlmerge.cli.options import option_flag, request_from_args
from vlmerge.cli.parser import build_parser
from vlmerge.core.errors import ConfigError, MergeError
from vlmerge.io.layout import Layout
from vlmerge.merging import ExpertSelection, MergeRequest

COMMANDS = ["merge", "tune"]


def subparser(command: str) -> argparse.ArgumentParser:
    actions = build_parser()._subparsers._group_actions
    return next(action for action in actions if isinstance(action, argparse._SubParsersAction)).choices[command]


def argv(command: str, *extra: str) -> list[str]:
    return [command, "specific.safetensors", "--method", "interpolation", "--out", "merged.safetensors", *extra]


class WithDevice(MergeRequest):
    device: str | None = Field(None, description="where the merge computes")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_field_added_to_the_request_is_a_flag_of_merge_and_tune(monkeypatch, command):
    monkeypatch.setattr(options, "REQUEST", WithDevice)
    assert "where the merge computes" in subparser(command).format_help()
    request = request_from_args(build_parser().parse_args(argv(command, "--device", "cpu")), command)
    assert isinstance(request, WithDevice) and request.device == "cpu"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_of_the_request_is_a_flag_with_its_description(command):
    parser = subparser(command)
    flags = {flag: action for action in parser._actions for flag in action.option_strings}
    positionals = {action.dest: action for action in parser._actions if not action.option_strings}
    for name, field in MergeRequest.model_fields.items():
        action = positionals[name] if field.is_required() else flags[option_flag(name)]
        assert action.help == field.description and field.description


@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_line_and_python_build_the_same_request(command):
    extra = ["--grams", "g.safetensors", "--experts", "vqa", "--layout", "beit3", "--image-size", "32"]
    request = request_from_args(build_parser().parse_args(argv(command, *extra)), command)
    given = {"grams": "g.safetensors", "selection": "vqa", "layout": "beit3", "image_size": 32}
    assert request == MergeRequest.of("specific.safetensors", **given)
    assert request.selection is ExpertSelection.VQA and request.layout is Layout.BEIT3
    assert request.overrides == {"image_size": 32}
    assert request_from_args(build_parser().parse_args(argv(command)), command) == MergeRequest(
        source="specific.safetensors"
    )


def test_a_request_is_frozen_and_names_what_is_wrong():
    request = MergeRequest.of("specific.safetensors")
    with pytest.raises(ValidationError):
        request.grams = "g.safetensors"
    with pytest.raises(ConfigError, match="unknown field 'grms'.*grams"):
        MergeRequest.of("specific.safetensors", grms="g.safetensors")
    with pytest.raises(MergeError, match="unknown expert selection 'vq'"):
        MergeRequest.of("specific.safetensors", selection="vq")
    with pytest.raises(ConfigError, match="grams"):
        MergeRequest.of(request, grams="g.safetensors")
    assert MergeRequest.of(request) is request
