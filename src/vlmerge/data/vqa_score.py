"""The VQA soft score: an answer is fully right when at least 3 of the annotators gave it."""

from collections.abc import Sequence


def normalize_answer(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".").split())


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: the mean over leave-one-annotator-out subsets of min(1, matches / 3)."""
    prediction = normalize_answer(prediction)
    matches = [normalize_answer(a) == prediction for a in answers]
    if len(answers) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(matches)
