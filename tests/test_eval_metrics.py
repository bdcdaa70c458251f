"""Answer normalisation and metrics on known cases."""

from __future__ import annotations

import pytest

from mllm.eval import caption_scores, exact_match, normalize_answer, qa_scores, vqa_accuracy


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two dogs!", "2 dogs"),
        ("A Red Circle.", "red circle"),
        ("the answer", "answer"),
        ("black-and-white", "black and white"),
        ("3.5", "3.5"),
        ("10,000", "10000"),
        ("dont know", "don't know"),
        ("  Yes\n", "yes"),
        ("There are 2.", "there are 2"),
        ("zero", "0"),
    ],
)
def test_vqa_normalisation_known_cases(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_vs_vqa_accuracy():
    assert exact_match(" yes ", "yes") == 1.0 and exact_match("Yes", "yes") == 0.0
    assert vqa_accuracy("Two dogs!", "2 dogs") == 1.0 and vqa_accuracy("cat", "dog") == 0.0
    # several human answers: min(matches / 3, 1)
    assert vqa_accuracy("2", ["two", "2", "3", "4"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("2", ["two", "2", "2"]) == 1.0


def test_qa_scores_overall_and_per_type():
    preds = ["Two dogs!", "circle", "Yes", "blue"]
    refs = ["2 dogs", "circle", "no", "red"]
    s = qa_scores(preds, refs, ["count", "shape", "yes/no", "color"])
    assert s["n"] == 4 and s["exact_match"] == 25.0 and s["vqa_accuracy"] == 50.0
    assert s["per_type"]["count"] == {"n": 1, "exact_match": 0.0, "vqa_accuracy": 100.0}
    assert s["per_type"]["color"]["vqa_accuracy"] == 0.0
    assert "per_type" not in qa_scores(preds, refs)
    with pytest.raises(ValueError, match="3 predictions for 4"):
        qa_scores(preds[:3], refs)


def test_caption_scores_perfect_and_wrong():
    refs = [
        "a red circle on a white background",
        "a blue triangle next to a green square",
        "a cat sits on a table",
    ]
    perfect = caption_scores(refs, refs)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    wrong = caption_scores(["the quick brown fox", "jumps over", "the lazy dog"], refs)
    assert (
        wrong["bleu4"] < 0.1 and wrong["rouge_l"] < perfect["rouge_l"] and wrong["cider"] < perfect["cider"]
    )


def test_wilson_interval_known_values_and_edges():
    from mllm.eval.metrics import wilson_interval

    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)  # the textbook 50/100 case
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.27 < high < 0.28  # not zero-width at the edge
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] < 0.73
    low, high = wilson_interval(900, 1000)
    assert 0.03 < high - low < 0.04  # n ~1,000: about ±2 points
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
