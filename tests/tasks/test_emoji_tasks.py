"""VQA- and NLVR2-style emoji examples: answers and labels re-derived independently from the records."""

import collections
import re

import pytest
import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.datasets.emoji.dataset import EmojiDataset, build_emoji_dataset
from vlmerge.data.datasets.emoji.records import EmojiRecord, EmojiSources
from vlmerge.data.datasets.emoji.tasks import NLVR2_TEMPLATES, VQAExample, VQASet, build_nlvr2, build_vqa
from vlmerge.data.splits import SPLITS

ROWS = [  # name, keywords, group, subgroup, split
    ("grinning face", ("face", "grin", "Grinning"), "Smileys & Emotion", "face-smiling", "train"),
    ("beaming face", ("beam", "face", "smile"), "Smileys & Emotion", "face-smiling", "train"),
    ("hugging face", ("face", "hug", "hugging"), "Smileys & Emotion", "face-hand", "val"),
    ("thinking face", ("face", "thinking", "hmm"), "Smileys & Emotion", "face-hand", "train"),
    ("grapes", ("fruit", "grape"), "Food & Drink", "food-fruit", "train"),
    ("melon", ("fruit", "melon", "cantaloupe"), "Food & Drink", "food-fruit", "val"),
    ("pizza", ("cheese", "pizza", "slice"), "Food & Drink", "food-prepared", "train"),
    ("hamburger", ("burger", "hamburger"), "Food & Drink", "food-prepared", "train"),
    ("new food", (), "Food & Drink", "food-prepared", "train"),  # newer than CLDR: no keywords
    ("chequered flag", ("checkered", "chequered", "racing"), "Flags", "flag", "test"),  # only group of its split
]
KEYWORD = re.compile(r"is this emoji about (.+)\?")
STATEMENT = re.compile(
    r"both emoji are in the same (group|subgroup)\."
    r"|the (left|right) emoji is in the (group|subgroup) (.+)\."
)


def make_dataset(rows) -> EmojiDataset:
    records = [
        EmojiRecord(chr(0x1F600 + i), (0x1F600 + i,), name, keywords, group, subgroup, chr(0x1F600 + i), split)
        for i, (name, keywords, group, subgroup, split) in enumerate(rows)
    ]
    return EmojiDataset.from_records(records, torch.zeros(len(records), 3, 2, 2, dtype=torch.uint8))


@pytest.fixture
def tiny() -> EmojiDataset:
    return make_dataset(ROWS)


@pytest.fixture(scope="module")
def real() -> EmojiDataset:
    missing = [str(path) for path in EmojiSources.default().files() if not path.is_file()]
    if missing:
        pytest.skip(
            f"Debian emoji sources absent ({', '.join(missing)}); "
            f"apt-get install fonts-noto-color-emoji unicode-cldr-core unicode-data"
        )
    return build_emoji_dataset(image_size=32)  # cached in ~/.cache/vlmerge/emoji after the first build


def check_vqa(dataset: EmojiDataset, vqa: VQASet) -> collections.Counter:
    """Every answer re-derived from the records; returns the count of (image, answer) keyword questions."""
    keyword_answers = collections.Counter()
    for example in vqa.examples:
        record = dataset.records[example.image]
        assert set(example.answers) <= set(vqa.answers) and list(example.answers.values()) == [1.0]
        if example.kind in ("group", "subgroup"):
            assert example.answers == {getattr(record, example.kind).lower(): 1.0}
            assert example.question == f"which {example.kind} is this emoji in?"
            continue
        assert example.kind == "keyword"
        keyword, (answer,) = KEYWORD.fullmatch(example.question)[1], example.answers
        own = {word.lower() for word in record.keywords}
        if answer == "yes":
            assert keyword in own
        else:
            assert answer == "no" and keyword not in own and keyword not in record.name.lower().split()
            assert any(
                keyword in map(str.lower, other.keywords)
                for other in dataset.records
                if other.subgroup != record.subgroup
            )
        keyword_answers[example.image, answer] += 1
    return keyword_answers


def nlvr2_truth(dataset: EmojiDataset, example) -> tuple[bool, str]:
    """The label and kind of a statement, parsed from its text alone."""
    match = STATEMENT.fullmatch(example.statement)
    assert match, example.statement
    left, right = dataset.records[example.left], dataset.records[example.right]
    if match[1]:
        return getattr(left, match[1]).lower() == getattr(right, match[1]).lower(), f"same-{match[1]}"
    named = left if match[2] == "left" else right
    return getattr(named, match[3]).lower() == match[4], f"{match[2]}-{match[3]}"


def check_nlvr2(dataset: EmojiDataset, examples) -> None:
    for example in examples:
        assert 0 <= example.left < len(dataset) and 0 <= example.right < len(dataset)
        assert example.left != example.right
        assert nlvr2_truth(dataset, example) == (example.label, example.kind)
    labels = collections.Counter(example.label for example in examples)
    assert abs(labels[True] - labels[False]) <= len(examples) % 2
    per_kind = collections.Counter((example.kind, example.label) for example in examples)
    assert all(abs(per_kind[kind, True] - per_kind[kind, False]) <= 1 for kind in NLVR2_TEMPLATES)


@pytest.mark.parametrize("seed", range(5))
def test_vqa_answers_and_keywords_are_right_and_balanced(tiny, seed):
    vqa = build_vqa(tiny, seed=seed)
    counted = check_vqa(tiny, vqa)
    assert collections.Counter(e.kind for e in vqa.examples) == {"group": 10, "subgroup": 10, "keyword": 18}
    for image, record in enumerate(tiny.records):
        expected = 1 if record.keywords else 0
        assert counted[image, "yes"] == counted[image, "no"] == expected


def test_vqa_asks_several_distinct_keywords(tiny):
    vqa = build_vqa(tiny, seed=1, keyword_questions_per_image=3)
    check_vqa(tiny, vqa)
    for image, record in enumerate(tiny.records):
        for answer in ("yes", "no"):
            asked = [e.question for e in vqa.examples if e.image == image and e.answers == {answer: 1.0}]
            assert len(asked) == len(set(asked)) == len(record.keywords)
    assert all(e.kind != "keyword" for e in build_vqa(tiny, keyword_questions_per_image=0).examples)
    scarce = make_dataset(
        [
            ("a", ("x", "y", "z"), "G", "s1", "train"),
            ("b", ("w",), "G", "s2", "train"),
            ("c", ("w", "v"), "G", "s2", "train"),
        ]
    )  # only "w" and "v" are foreign to "a"
    counted = check_vqa(scarce, build_vqa(scarce, keyword_questions_per_image=3))
    assert counted == {(0, "yes"): 2, (0, "no"): 2, (1, "yes"): 1, (1, "no"): 1, (2, "yes"): 2, (2, "no"): 2}
    with pytest.raises(ConfigError, match="keyword_questions_per_image"):
        build_vqa(tiny, keyword_questions_per_image=-1)


def test_vqa_is_deterministic_for_a_seed(tiny):
    assert build_vqa(tiny, seed=3) == build_vqa(tiny, seed=3)
    assert build_vqa(tiny, seed=3).examples != build_vqa(tiny, seed=4).examples


def test_vqa_vocabulary_is_the_builds_in_every_split(tiny):
    expected = tuple(
        sorted(
            {
                "smileys & emotion",
                "food & drink",
                "flags",
                "face-smiling",
                "face-hand",
                "food-fruit",
                "food-prepared",
                "flag",
                "yes",
                "no",
            }
        )
    )
    parts = {name: build_vqa(tiny.split(name)) for name in SPLITS}
    assert all(vqa.answers == expected for vqa in parts.values())
    assert not any("flags" in e.answers for e in parts["train"].examples)  # in the vocabulary all the same
    test = parts["test"]
    group_question = next(e for e in test.examples if e.kind == "group")
    assert test.target(group_question).argmax().item() == expected.index("flags")
    assert test.targets().shape == (len(test.examples), len(expected))


def test_vqa_soft_targets_and_score():
    several = VQAExample(0, "what is it?", {"c": 0.3, "a": 1.0}, "future")
    vqa = VQASet((several,), ("a", "b", "c"))
    assert vqa.answer_index() == {"a": 0, "b": 1, "c": 2}
    target = vqa.target(several)
    assert target.dtype == torch.float32 and torch.allclose(target, torch.tensor([1.0, 0.0, 0.3]))
    assert (VQASet.score(several, "c"), VQASet.score(several, "a"), VQASet.score(several, "b")) == (0.3, 1.0, 0.0)
    for bad in ({}, {"a": 0.0}, {"a": 1.5}):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            VQAExample(0, "q?", bad, "group")
    with pytest.raises(ConfigError, match=r"\['z'\] .* not in the answer vocabulary"):
        vqa.target(VQAExample(0, "q?", {"z": 1.0}, "group"))


@pytest.mark.parametrize("seed", range(5))
def test_nlvr2_labels_and_balance(tiny, seed):
    examples = build_nlvr2(tiny, seed=seed)
    assert len(examples) == 2 * len(tiny)
    check_nlvr2(tiny, examples)
    assert sum(e.label for e in examples) == len(tiny)
    assert {e.kind for e in examples} == set(NLVR2_TEMPLATES)
    odd = build_nlvr2(tiny, num_examples=13, seed=seed)
    check_nlvr2(tiny, odd)
    assert len(odd) == 13 and sum(e.label for e in odd) == 7


def test_nlvr2_stays_inside_the_split(tiny):
    train = tiny.split("train")
    examples = build_nlvr2(train, num_examples=200)
    check_nlvr2(train, examples)
    assert {i for e in examples for i in (e.left, e.right)} <= set(range(len(train)))


def test_nlvr2_is_deterministic_for_a_seed(tiny):
    assert build_nlvr2(tiny, seed=5) == build_nlvr2(tiny, seed=5)
    assert build_nlvr2(tiny, seed=5) != build_nlvr2(tiny, seed=6)


def test_nlvr2_rejects_impossible_requests(tiny):
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="num_examples"):
            build_nlvr2(tiny, num_examples=bad)
    with pytest.raises(ConfigError, match="empty"):
        build_nlvr2(make_dataset([]))
    with pytest.raises(ConfigError, match="empty"):
        build_vqa(make_dataset([]))
    with pytest.raises(ConfigError, match="unknown NLVR2 kinds"):
        build_nlvr2(tiny, kinds=("same-colour",))
    one_subgroup = make_dataset([row[:3] + ("face-smiling", "train") for row in ROWS[:3]])
    with pytest.raises(ConfigError, match="false 'same-subgroup'"):
        build_nlvr2(one_subgroup)
    singletons = make_dataset([ROWS[0], ROWS[2], ROWS[4]])  # three subgroups of one image each
    with pytest.raises(ConfigError, match="true 'same-subgroup'"):
        build_nlvr2(singletons)
    allowed = build_nlvr2(singletons, kinds=("same-group", "left-subgroup"), seed=2)
    check_nlvr2(singletons, allowed)
    assert {e.kind for e in allowed} == {"same-group", "left-subgroup"}
    with pytest.raises(ConfigError, match="1 emoji cannot"):
        build_nlvr2(make_dataset(ROWS[:1]), kinds=("left-group",))


def test_real_build(real):
    parts = {name: real.split(name) for name in SPLITS}
    answers = {build_vqa(part).answers for part in parts.values()}
    assert len(answers) == 1 and len(answers.pop()) == len(real.groups) + len(real.subgroups) + 2
    for name in ("train", "test"):
        vqa = build_vqa(parts[name], seed=7)
        counted = check_vqa(parts[name], vqa)
        assert sum(counted[key] for key in counted if key[1] == "yes") == sum(
            counted[key] for key in counted if key[1] == "no"
        )
        assert len(counted) > 1.9 * len(parts[name])  # nearly every emoji has keywords
    test = parts["test"]
    examples = build_nlvr2(test, seed=7)
    check_nlvr2(test, examples)
    assert len(examples) == 2 * len(test) and sum(e.label for e in examples) == len(test)
