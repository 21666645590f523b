"""Public-format loaders on small files the tests write, and the VQA score."""

import json

import pytest
import torch
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.data.formats import image_folder, load_image, load_karpathy_captions, load_nlvr2, load_vqav2
from vlmerge.data.vqa_score import vqa_score


def test_karpathy_split_json(tmp_path):
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "test",
                "sentences": [{"raw": "A cat."}, {"raw": "A pet."}],
            },
            {"filepath": "train2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A dog."}]},
        ],
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    train = load_karpathy_captions(tmp_path / "dataset_coco.json", tmp_path / "coco", split="train")
    assert [(e.image.name, e.captions, e.split) for e in train] == [("b.jpg", ("A dog.",), "train")]
    test = load_karpathy_captions(tmp_path / "dataset_coco.json", tmp_path / "coco", split="test")
    assert test[0].image == tmp_path / "coco" / "val2014" / "a.jpg" and len(test[0].captions) == 2


def test_vqav2_questions_and_annotations(tmp_path):
    (tmp_path / "q.json").write_text(
        json.dumps({"questions": [{"image_id": 42, "question": "What color?", "question_id": 7}]})
    )
    answers = [{"answer": "red", "answer_id": i} for i in range(7)] + [{"answer": "blue", "answer_id": 9}] * 3
    (tmp_path / "a.json").write_text(
        json.dumps({"annotations": [{"question_id": 7, "image_id": 42, "answers": answers}]})
    )
    (example,) = load_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img")
    assert example.image.name == "COCO_val2014_000000000042.jpg" and example.answers.count("red") == 7
    (tmp_path / "a.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ConfigError, match="no annotation for question 7"):
        load_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img")


def test_nlvr2_jsonl(tmp_path):
    lines = [
        {"identifier": "dev-850-0-3", "sentence": "Two dogs.", "label": "True"},
        {"identifier": "dev-851-1-0", "sentence": "No dogs.", "label": "False"},
    ]
    (tmp_path / "dev.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = load_nlvr2(tmp_path / "dev.json", tmp_path / "images")
    assert first.left.name == "dev-850-0-img0.png" and first.right.name == "dev-850-0-img1.png"
    assert first.label is True and second.label is False
    (tmp_path / "bad.json").write_text('{"identifier": "x-1-0-0", "sentence": "s", "label": "maybe"}\n')
    with pytest.raises(ConfigError, match="bad.json:1: label must be True or False"):
        load_nlvr2(tmp_path / "bad.json", tmp_path)


def test_images_are_composited_on_white_and_resized(tmp_path):
    Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent red
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.jpg")
    clear, blue = load_image(tmp_path / "clear.png", 16), load_image(tmp_path / "blue.jpg", 16)
    assert clear.shape == (3, 16, 16) and torch.allclose(clear, torch.ones_like(clear))
    assert blue[2].mean() > 0.9 and blue[0].mean() < 0.1
    assert [p.name for p in image_folder(tmp_path)] == ["blue.jpg", "clear.png"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="not a readable image"):
        load_image(tmp_path / "broken.png", 16)


def test_malformed_json_is_named(tmp_path):
    (tmp_path / "x.json").write_text("{oops")
    with pytest.raises(ConfigError, match="x.json: not valid JSON"):
        load_karpathy_captions(tmp_path / "x.json", tmp_path)


@pytest.mark.parametrize("count, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_is_the_official_leave_one_out_average(count, expected):
    answers = ["yes"] * count + ["no"] * (10 - count)
    # e.g. 3 matches: 3 subsets drop a match (2/3), 7 drop a non-match (1): (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_score("Yes.", answers) == pytest.approx(expected)
