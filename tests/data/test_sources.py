"""Data sources: the paper's public formats (COCO Karpathy JSON, VQAv2, NLVR2, an image
folder) from small files the tests write, run through every stage; the checks made before
anything is read; pooled datasets; retrieval with several captions per image."""

import json

import pytest
import torch
import yaml
from PIL import Image

from vlmerge.cli.main import main
from vlmerge.core.errors import ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.datasets import vqav2
from vlmerge.data.sources import ConcatImages, check_data, load_pairs, load_source, pool_pairs
from vlmerge.data.vqa_score import vqa_score
from vlmerge.tasks.retrieval import Retrieval, retrieval_metrics, retrieval_samples

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (230, 200, 0), (120, 0, 160), (0, 180, 200)]
NAMES = ["red", "green", "blue", "yellow", "purple", "teal"]
SPLIT_OF = ["train"] * 4 + ["test"] * 2  # image i of each colour list


def colour_at_centre(images):
    """Index into COLOURS of each image's centre pixel (JPEG shifts values a little)."""
    centre = images[:, :, 8, 8].float()
    return (centre[:, None, :] - torch.tensor(COLOURS, dtype=torch.float)[None]).abs().sum(-1).argmin(1).tolist()


def picture(path, colour, corner):
    """A colour square with a white corner patch, so images of one colour still differ."""
    image = Image.new("RGB", (24, 24), colour)
    image.paste((255, 255, 255), (corner * 4, 0, corner * 4 + 4, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    """A miniature COCO + VQAv2 + NLVR2 + ImageNet-style tree: 6 colours x 4 pictures."""
    root = tmp_path_factory.mktemp("paper")
    coco = {"images": []}
    questions = {split: [] for split in ("train", "test")}
    annotations = {split: [] for split in ("train", "test")}
    for c, (colour, name) in enumerate(zip(COLOURS, NAMES)):
        for k in range(4):
            image_id = 10 * c + k
            split = "train" if k < 3 else "test"
            subset = {"train": "train2014", "test": "val2014"}[split]
            picture(root / "coco" / subset / f"COCO_{subset}_{image_id:012d}.jpg", colour, k)
            picture(root / "imagenet" / split / name / f"{k}.png", colour, k)
            coco["images"].append(
                {
                    "filepath": subset,
                    "filename": f"COCO_{subset}_{image_id:012d}.jpg",
                    "split": "restval" if k == 0 else split,
                    "sentences": [{"raw": f"a {name} square."}, {"raw": f"something {name}."}],
                }
            )
            qid = 100 * image_id
            questions[split].append({"image_id": image_id, "question": "what colour is it?", "question_id": qid})
            answers = [name] * 8 + ["dark"] * 2
            annotations[split].append({"question_id": qid, "answers": [{"answer": a} for a in answers]})
            questions[split].append({"image_id": image_id, "question": "is it red?", "question_id": qid + 1})
            yes = "yes" if name == "red" else "no"
            annotations[split].append({"question_id": qid + 1, "answers": [{"answer": yes}] * 10})
    (root / "dataset_coco.json").write_text(json.dumps(coco))
    for split in ("train", "test"):
        (root / f"q_{split}.json").write_text(json.dumps({"questions": questions[split]}))
        (root / f"a_{split}.json").write_text(json.dumps({"annotations": annotations[split]}))
    for split in ("train", "val", "test"):
        lines = []
        for n in range(8):
            left, right = n % 6, (n + (n % 2)) % 6  # odd n: two colours, even n: the same colour twice
            stem = f"{split}-{n}-0"
            picture(root / "nlvr2" / split / f"{stem}-img0.png", COLOURS[left], 0)
            picture(root / "nlvr2" / split / f"{stem}-img1.png", COLOURS[right], 1)
            lines.append(
                {
                    "identifier": f"{stem}-0",
                    "sentence": "both squares have the same colour.",
                    "label": str(left == right),
                }
            )
        (root / f"nlvr2_{split}.json").write_text("\n".join(json.dumps(line) for line in lines))
    return {
        "coco": {"karpathy_json": str(root / "dataset_coco.json"), "images": str(root / "coco")},
        "vqav2": {
            **{
                f"{s}_{k}": str(root / f"{p}_{s}.json")
                for s in ("train", "test")
                for k, p in (("questions", "q"), ("annotations", "a"))
            },
            "train_images": str(root / "coco" / "train2014"),
            "test_images": str(root / "coco" / "val2014"),
        },
        "nlvr2": {
            **{f"{s}_json": str(root / f"nlvr2_{s}.json") for s in ("train", "val", "test")},
            **{f"{s}_images": str(root / "nlvr2" / s) for s in ("train", "val", "test")},
        },
        "image_folder": {"train": str(root / "imagenet" / "train"), "test": str(root / "imagenet" / "test")},
    }


def source(files, name, **fields):
    return load_source(DataConfig(dataset=name, image_size=16, paths=files[name], **fields))


def test_karpathy_pairs_keep_every_caption_and_read_images_on_demand(paper_files):
    pairs = source(paper_files, "coco").pairs("train")
    assert len(pairs.images) == 18 and len(pairs) == 36  # restval counts as train
    assert pairs.image_of.tolist() == [i // 2 for i in range(36)]
    assert pairs.captions[:2] == ("a red square.", "something red.")
    images = pairs.images[torch.tensor([0, 3])]
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16)
    assert colour_at_centre(images) == [0, 1]  # image 3 is the first green one


def test_vqav2_soft_scores_vocabulary_and_question_kinds(paper_files, monkeypatch):
    # The first 10 train questions ask about 3 red and 2 green pictures: 'red' 24 times, 'green' 16, 'dark' 10,
    # 'yes' 30, 'no' 20.
    monkeypatch.setattr(vqav2, "VQA_MIN_ANSWER_COUNT", 20)
    vqa = source(paper_files, "vqav2", limit=10)
    assert vqa.answer_vocabulary() == ("no", "red", "yes")
    questions = vqa.questions("test")
    colour = questions.questions.index("what colour is it?")
    assert questions.answers[colour] == pytest.approx(
        {NAMES[0]: 1.0, "dark": vqa_score("dark", ["r"] * 8 + ["dark"] * 2)}
    )
    assert set(questions.kinds) == {"other", "yes/no"}
    with pytest.raises(ConfigError, match="no split 'val'"):
        vqa.questions("val")


def test_nlvr2_and_image_folder(paper_files):
    statements = source(paper_files, "nlvr2").statements("val")
    same = [
        a == b
        for a, b in zip(
            colour_at_centre(statements.images[statements.left]), colour_at_centre(statements.images[statements.right])
        )
    ]
    assert statements.labels.tolist() == same and any(same) and not all(same)
    classes = source(paper_files, "image_folder").image_classes("test")
    assert classes.classes == tuple(sorted(NAMES)) and len(classes) == 6
    assert colour_at_centre(classes.images[torch.arange(6)]) == [
        NAMES.index(classes.classes[label]) for label in classes.labels.tolist()
    ]


@pytest.mark.parametrize(
    "config, uses, message",
    [
        (DataConfig(dataset="cocoo"), [], "unknown dataset 'cocoo'; did you mean 'coco'?"),
        (DataConfig(dataset="coco", paths={"karpathy_json": "x.json"}), [], "needs data.paths ['images']"),
        (
            DataConfig(dataset="coco", paths={"karpathy_json": "x", "images": "y", "image": "z"}),
            [],
            "data.paths.image: not a file of dataset 'coco'; did you mean 'images'?",
        ),
        (DataConfig(dataset="emoji", paths={"images": "y"}), [], "it reads no paths"),
        (
            DataConfig(dataset="coco", paths={"karpathy_json": "x", "images": "y"}),
            ["questions"],
            "dataset 'coco' provides no questions; datasets with questions: ['easy_vqa', 'emoji', 'vqav2']",
        ),
        (
            DataConfig(dataset=("emoji", "coco"), paths={"coco.karpathy_json": "x", "coco.images": "y"}),
            ["questions"],
            "datasets ['emoji', 'coco'] can be pooled for pre-training only; a task reads one",
        ),
        (
            DataConfig(dataset=("emoji", "coco"), paths={"karpathy_json": "x", "coco.images": "y"}),
            [],
            "data.paths.karpathy_json: with several datasets, path keys start with the dataset's name",
        ),
        (DataConfig(dataset=("emoji", "emoji2")), ["pairs"], "unknown dataset 'emoji2'"),
    ],
)
def test_bad_data_configs_fail_before_anything_is_read(config, uses, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace("?", r"\?")):
        check_data(config, uses)


def test_pooled_pairs_keep_each_dataset_s_images_and_captions(paper_files):
    coco = DataConfig(dataset="coco", image_size=16, paths=paper_files["coco"])
    first, second = load_pairs(coco, "test"), load_pairs(coco, "train")
    pooled = pool_pairs([first, second])
    assert len(pooled) == len(first) + len(second) and pooled.captions[len(first)] == second.captions[0]
    rows = torch.tensor([len(first) + 5, 0, len(first)])
    expected = torch.stack(
        [
            second.images[second.image_of[5:6]][0],
            first.images[first.image_of[:1]][0],
            second.images[second.image_of[:1]][0],
        ]
    )
    assert torch.equal(pooled.images[pooled.image_of[rows]], expected)
    assert torch.equal(
        ConcatImages([torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.ones(1, 3, 4, 4, dtype=torch.uint8)])[1:3]
        .flatten(1)
        .amax(1),
        torch.tensor([0, 1], dtype=torch.uint8),
    )
    both = DataConfig(
        dataset=("coco", "flickr30k"),
        image_size=16,  # the same files under two names
        paths={f"{name}.{key}": path for name in ("coco", "flickr30k") for key, path in paper_files["coco"].items()},
    )
    loaded = load_pairs(both, "test")
    assert loaded.captions == first.captions * 2 and len(loaded.images) == 2 * len(first.images)
    assert loaded.image_of[len(first) :].tolist() == (first.image_of + len(first.images)).tolist()


def test_retrieval_metrics_with_several_captions_per_image():
    # 2 images, 4 captions: captions 0, 1 describe image 0; 2, 3 describe image 1.
    image_of = torch.tensor([0, 0, 1, 1])
    similarity = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0],  # image 0: best caption 1 (its own) -> i2t hit at 1
            [0.7, 0.0, 0.2, 0.6],
        ]
    )  # image 1: best caption 0 (not its own), then 3 (own)
    metrics = retrieval_metrics(similarity, image_of)
    assert metrics["i2t_r1"] == 0.5 and metrics["i2t_r5"] == 1.0
    # t2i: caption 0 -> image 1 (miss), 1 -> 0 (hit), 2 -> 0 (miss), 3 -> 1 (hit)
    assert metrics["t2i_r1"] == 0.5 and metrics["t2i_r5"] == 1.0
    assert retrieval_metrics(torch.eye(3))["mean_recall"] == 1.0
    # per query, the mean of its hits at 1, 5 and 10 (k capped at the gallery size)
    samples = retrieval_samples(similarity, image_of)
    assert samples["i2t"] == pytest.approx([1, 2 / 3]) and samples["t2i"] == pytest.approx([2 / 3, 1, 2 / 3, 1])
    assert metrics["mean_recall"] == pytest.approx(5 / 6)
    assert Retrieval.primary_statistic(samples) == pytest.approx(metrics["mean_recall"], rel=1e-12)


def test_the_paper_formats_run_through_every_stage(paper_files, tmp_path, capsys):
    """Seed pre-training on COCO captions, then each task fine-tuned on its own dataset and re-evaluated."""

    def config(path, **fields):
        path.write_text(
            yaml.safe_dump({"optimizer": {"batch_size": 4, "lr": 1e-3}, "steps": 3, "checkpoint_every": 3, **fields})
        )
        return str(path)

    data = {"image_size": 16}
    seed = config(
        tmp_path / "seed.yaml",
        data={**data, "dataset": "coco", "paths": paper_files["coco"]},
        model={"size": "micro", "fusion_layer": 2},
        tokenizer={"vocab_size": 60},
    )
    assert main(["train", "seed", "--config", seed, "--run-dir", str(tmp_path / "seed"), "--quiet"]) == 0
    checkpoint = str(tmp_path / "seed" / "model.safetensors")
    for task, dataset, metric in [
        ("retrieval", "coco", "mean_recall"),
        ("vqa", "vqav2", "vqa_score"),
        ("nlvr2", "nlvr2", "accuracy"),
        ("classify_image", "image_folder", "accuracy"),
    ]:
        run = tmp_path / task
        fields = {"task": task, "init": checkpoint, "data": {**data, "dataset": dataset, "paths": paper_files[dataset]}}
        assert (
            main(
                [
                    "train",
                    "finetune",
                    "--config",
                    config(tmp_path / f"{task}.yaml", **fields),
                    "--run-dir",
                    str(run),
                    "--quiet",
                ]
            )
            == 0
        )
        capsys.readouterr()
        saved = json.loads((run / "results.json").read_text())["metrics"][metric]
        assert main(["evaluate", str(run)]) == 0
        assert f"{saved:.4f}" in capsys.readouterr().out
    wrong = config(
        tmp_path / "wrong.yaml",
        task="vqa",
        init=checkpoint,
        data={**data, "dataset": "coco", "paths": paper_files["coco"]},
    )
    assert main(["train", "finetune", "--config", wrong, "--run-dir", str(tmp_path / "wrong"), "--quiet"]) == 2
    assert "dataset 'coco' provides no questions" in capsys.readouterr().err
