"""A typo in a stage config or a study recipe is one error line naming the nearest valid field.

Cases tested elsewhere are not repeated: a typo in a stage config's optimizer (test_stages.py) and
a recipe's top-level `total_step` (test_study.py). Bad merge inputs are in test_engine_cli.py.
"""

import pytest

from vlmerge.cli.main import main

TYPOS = {  # case: (command, config text, what the one error line says)
    "stage-field": ("train", "stepz: 10\n", "unknown field 'stepz'; did you mean 'steps'?"),
    "stage-model": (
        "train",
        "model: {size: micro, fusion_layr: 1}\n",
        "unknown field 'model.fusion_layr'; did you mean 'fusion_layer'?",
    ),
    "stage-data": ("train", "data: {image_sise: 32}\n", "unknown field 'data.image_sise'; did you mean 'image_size'?"),
    "recipe-nested": (
        "study",
        "name: x\nfinetune: {stepz: 4}\n",
        "unknown field 'finetune.stepz'; did you mean 'steps'?",
    ),
    "recipe-list-item": (
        "study",
        "name: x\nmerges: [{method: regmean, optoins: {alpha: 0.9}}]\n",
        "unknown field 'merges.0.optoins'; did you mean 'options'?",
    ),
    "recipe-method": (
        "study",
        "name: x\nmain_merge: {method: interpolaton}\n",
        "unknown merge method 'interpolaton'; did you mean 'interpolation'?",
    ),
    "recipe-task": ("study", "name: x\ntasks: [retreival]\n", "unknown task 'retreival'; did you mean 'retrieval'?"),
    "recipe-merge-option": (
        "study",
        "name: x\nmain_merge: {method: interpolation, options: {raito: 0.5}}\n",
        "did you mean 'ratio'?",
    ),
}


@pytest.mark.parametrize("case", list(TYPOS))
def test_a_config_typo_is_one_error_naming_the_nearest_field(tmp_path, capsys, case):
    command, text, message = TYPOS[case]
    config, run_dir = tmp_path / "config.yaml", tmp_path / "run"
    config.write_text(text)
    if command == "train":
        args = ["train", "seed", "--config", str(config), "--run-dir", str(run_dir), "--quiet"]
    else:
        args = ["study", str(config), "--out", str(run_dir), "--dry-run"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run_dir.exists()
