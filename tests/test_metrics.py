"""Metrics on tables of tricky cases, each value worked out from the official definitions."""

from __future__ import annotations

import pytest

from egg_eval.metrics import (
    anls,
    best_grid_iou,
    box_iou,
    exact_match,
    free_form_match,
    grid_cover_ious,
    multiple_choice,
    normalize_vqa_answer,
    pope,
    region_localisation,
    vqa_accuracy,
)

TEN = ["two"] * 3 + ["2"] * 2 + ["the 2"] + ["three"] * 4


@pytest.mark.parametrize(
    ("pred", "norm"),
    [
        ("Two", "2"),
        ("the cat.", "cat"),
        ("5.", "5"),
        ("5.5", "5.5"),
        ("  Coca-Cola!  ", "coca cola"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("an apple", "apple"),
        ("yes\n", "yes"),
        ("man's hat", "man 's hat"),
    ],
)
def test_vqa_normalisation(pred, norm):
    assert normalize_vqa_answer(pred) == norm


@pytest.mark.parametrize(
    ("pred", "answers", "acc"),
    [
        ("2", TEN, 1.0),  # 6 matching after normalisation
        ("Three.", TEN, 1.0),  # 4 matches: every leave-one-out subset still has >= 3
        ("four", TEN, 0.0),
        ("cat", ["cat", "cat"] + ["dog"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
        ("cat", ["cat"] * 3 + ["dog"] * 7, (3 * (2 / 3) + 7 * 1.0) / 10),
        ("", ["a"] * 10, 1.0),  # "a" normalises to "" (an article)
    ],
)
def test_vqa_accuracy(pred, answers, acc):
    assert vqa_accuracy(pred, answers) == pytest.approx(acc)


@pytest.mark.parametrize(
    ("pred", "answers", "score"),
    [
        ("Hello World", ["hello  world"], 1.0),
        ("helo world", ["hello world"], 1 - 1 / 11),
        ("abc", ["xyz"], 0.0),
        ("abcd", ["abxy"], 0.5),  # a score of exactly 0.5 is kept (the RRC test is score < 0.5)
        ("abcde", ["vwxyz"], 0.0),
        ("abcde", ["abxde"], 0.8),
        ("12", ["twelve", "12 "], 1.0),  # best over answers
        ("", ["x"], 0.0),
    ],
)
def test_anls(pred, answers, score):
    assert anls(pred, answers) == pytest.approx(score)


OPTS = ["cat", "dog", "a red car", "blue"]


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("B", "B", 1.0),
        ("(B)", "B", 1.0),
        ("B.", "B", 1.0),
        ("b", "B", 1.0),
        ("Answer: B", "B", 1.0),  # lmms-eval reads this as A
        ("The answer is (C).", "C", 1.0),
        ("B. dog", "B", 1.0),
        ("(D) blue", "D", 1.0),
        ("dog", "B", 1.0),  # the option text itself
        ("A red car", "C", 1.0),  # starts with the article "A" but is option C's text
        ("I think it is a red car", "C", 1.0),
        ("The correct option is D", "D", 1.0),
        ("Z", "B", 0.0),
        ("I don't know", "A", 0.0),
        ("A or B", "A", 0.0),  # two letters: unparseable, not a lucky guess
        ("", "A", 0.0),
        ("The animal is a dog.", "B", 1.0),  # names exactly one option by its text
        ("It is blue.", "D", 1.0),
        ("a cat or a dog", "A", 0.0),  # names two options: none
        ("a cat or a dog", "B", 0.0),
        ("The answer is a red car", "C", 1.0),  # "a" after "answer is" is the article, not the letter A
        ("A dog.", "B", 1.0),  # the article A before option B's text
        ("A is correct", "A", 1.0),
        ("I think B is right", "B", 1.0),
        ("a green bird", "A", 0.0),  # names no option, and "a" is no letter
    ],
)
def test_multiple_choice(pred, gold, ok):
    assert multiple_choice(pred, OPTS, gold) == ok


def test_a_named_option_inside_another_named_option_is_not_named_twice():
    opts = ["red", "dark red", "blue"]
    assert multiple_choice("It is dark red.", opts, "B") == 1.0
    assert multiple_choice("It is red.", opts, "A") == 1.0
    assert multiple_choice("red and blue", opts, "A") == 0.0


def test_multiple_choice_with_letters_and_text_answer():
    assert multiple_choice("(C)", ["A", "B", "C", "D"], "C") == 1.0
    assert multiple_choice("C", OPTS, "a red car") == 1.0
    with pytest.raises(ValueError):
        multiple_choice("C", OPTS, "a tree")


def test_pope_counts_and_yes_ratio_of_predictions():
    preds = ["Yes, there is a dog.", "No.", "There is not a cat", "yes", "No, none.", "Yes"]
    labels = ["yes", "no", "yes", "no", "no", "yes"]
    m = pope(preds, labels)
    # parsed: yes no no yes no yes ; tp=2 fp=1 tn=2 fn=1
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)  # predictions, not ground truth (3/6 too here)
    assert pope(["yes"] * 4, ["no"] * 4)["yes_ratio"] == 1.0


def test_a_failed_pope_sample_is_wrong_everywhere_and_in_no_yes_ratio():
    preds = ["yes", "no", None, None]  # the two failures: gold yes, gold no
    labels = ["yes", "no", "yes", "no"]
    m = pope(preds, labels)
    # counted as the answer opposite to their label: tp=1 tn=1 fn=1 fp=1
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["yes_ratio"] == 0.5 and m["n_failed"] == 2  # of the two answered, one yes
    # an empty prediction is an answer ("" reads as yes, as eval_pope reads it), a failure is not
    assert pope(["", "no"], ["no", "no"])["yes_ratio"] == 0.5 and pope([None, "no"], ["no", "no"])["yes_ratio"] == 0.0


@pytest.mark.parametrize(("p", "a", "ok"), [("Yes.", "yes", 1), ("left ", "left", 0), ("the table", "table", 0)])
def test_exact_match(p, a, ok):
    assert exact_match(p, a) == ok


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_region_localisation_takes_the_best_box_and_its_centre():
    boxes = [[100, 100, 120, 120], [0, 0, 10, 10]]
    # the region overlaps the second box best and holds its centre (5, 5)
    assert region_localisation([0, 0, 20, 10], boxes) == {"iou": pytest.approx(0.5), "hit": 1.0}
    # overlaps the second box (IoU 16/120) but misses its centre
    loc = region_localisation([6, 6, 12, 12], boxes)
    assert loc["iou"] == pytest.approx(16 / (100 + 36 - 16)) and loc["hit"] == 0.0
    assert region_localisation([200, 200, 210, 210], boxes) == {"iou": 0.0, "hit": 0.0}


def test_best_grid_iou_is_the_best_box_on_the_grid_lines():
    # a 60 px square across 40 px cells: the middle cell alone (1600/3600) beats every larger box
    assert best_grid_iou([0, 40, 80, 120], [0, 40, 80, 120], [30, 30, 90, 90]) == pytest.approx(1600 / 3600)
    assert best_grid_iou([0, 40, 80], [0, 40, 80], [0, 0, 80, 40]) == 1.0


def test_grid_cover_ious_of_the_touched_and_the_centred_cells():
    lines = [0, 40, 80, 120]
    # touches all 9 cells (box 0..120), centres inside: only the middle cell (40..80)
    assert grid_cover_ious(lines, lines, [30, 30, 90, 90]) == pytest.approx(
        {"touched": 3600 / 14400, "centred": 1600 / 3600}
    )
    # a box inside one cell, not holding its centre: touched is that cell, centred is empty
    assert grid_cover_ious(lines, lines, [2, 2, 12, 12]) == pytest.approx({"touched": 100 / 1600, "centred": 0.0})
    assert grid_cover_ious(lines, lines, [40, 0, 80, 40]) == {"touched": 1.0, "centred": 1.0}


RWQA_MC = "Please answer directly with only the letter of the correct option and nothing else."
RWQA_OPEN = "Please answer directly with a single word or number."


@pytest.mark.parametrize(
    "question, prompt",
    [  # RealWorldQA's own instruction gives way to the paper's (Appendix G)
        (
            f"Which way is the car facing?\nA. left\nB. right\nC. towards us\n{RWQA_MC}",
            "Which way is the car facing?\nA. left\nB. right\nC. towards us\n"
            "Answer with the option's letter from the given choices directly.",
        ),
        (
            f"How many lanes are there?\n{RWQA_OPEN}",
            "How many lanes are there?\nAnswer the question using a single word or phrase.",
        ),
        (
            "Is it red?\n(A) yes\n(B) no\nAnswer with the option's letter from the given choices directly.",
            "Is it red?\n(A) yes\n(B) no\nAnswer with the option's letter from the given choices directly.",
        ),
        (
            "Which colour? (A) red (B) blue",
            "Which colour? (A) red (B) blue\nAnswer with the option's letter from the given choices directly.",
        ),
    ],
)
def test_multiple_choice_prompts_replace_the_datasets_instruction(question, prompt):
    from egg_eval.data.benchmarks import Sample
    from egg_eval.data.prompts import prompt_for

    assert prompt_for(Sample(id="1", question=question, image=None, answers=["A"]), "mc") == prompt


@pytest.mark.parametrize(
    "question, answer, prediction, score",
    [
        (f"How many lanes are there?\n{RWQA_OPEN}", "3", "Three.", 1.0),  # free-form: the text is compared
        (f"How many lanes are there?\n{RWQA_OPEN}", "3", "A", 0.0),
        (f"Is the light green?\n{RWQA_OPEN}", "Yes", "yes", 1.0),  # used to stop the run: 'Yes' is no letter
        (f"Which way?\nA. left\nB. right\n{RWQA_MC}", "B", "B. right", 1.0),
        (f"Which way?\nA. left\nB. right\n{RWQA_MC}", "B", "A", 0.0),
        ("Which colour? (A) red (B) blue", "B", "(B)", 1.0),  # options in a run
        ("Which colour? A red, B blue", "B", "B", 1.0),  # a layout not recognised: a letter answer is still a letter
    ],
)
def test_a_multiple_choice_benchmark_scores_its_free_form_questions_by_their_text(question, answer, prediction, score):
    from egg_eval.data.benchmarks import BenchmarkSpec, Sample
    from egg_eval.scoring import score_sample

    spec = BenchmarkSpec(name="rwqa", hf_id="x", split="test", metric="multiple_choice")
    sample = Sample(id="1", question=question, image=None, answers=[answer])
    assert score_sample(spec, sample, prediction) == {"multiple_choice": score}


@pytest.mark.parametrize("p, a, ok", [("Three.", "3", 1.0), ("the dog", "Dog", 1.0), ("two dogs", "2", 0.0)])
def test_free_form_match(p, a, ok):
    assert free_form_match(p, a) == ok


def test_a_gold_answer_the_metric_cannot_read_fails_that_sample_only():
    from egg_eval.data.benchmarks import BenchmarkSpec, Sample
    from egg_eval.scoring import make_record

    spec = BenchmarkSpec(name="rwqa", hf_id="x", split="test", metric="multiple_choice")
    rec = make_record(
        Sample(id="1", question="Which?\nA. x\nB. y", image=None, answers=["maybe"]), "A", None, None, spec, 0.1
    )
    assert rec["error"].startswith("scoring the prediction: ValueError: answer 'maybe'") and rec["prediction"] == "A"
    assert rec["metrics"] == {"multiple_choice": 0.0}


@pytest.mark.parametrize(
    "error, kind",
    [
        ("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", "OutOfMemoryError: CUDA out of memory"),
        (
            "ValueError: not an image PIL can read: 40 bytes starting b'\\x89PNG'",
            "ValueError: not an image PIL can read",
        ),
        (
            "FileNotFoundError: [Errno 2] No such file or directory: '/d/a.png'",
            "FileNotFoundError: No such file or directory",
        ),
        ("KeyError: image '12' is not in the images split", "KeyError: image is not in the images split"),
        ("scoring the prediction: ValueError: answer 'x' is neither", "scoring the prediction: ValueError"),
        ("RuntimeError", "RuntimeError"),
    ],
)
def test_error_kind_drops_what_varies_per_sample(error, kind):
    from egg_eval.scoring import error_kind

    assert error_kind(error) == kind
