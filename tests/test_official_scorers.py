"""Our metrics against the official scorers, case for case.

Every expected value below was printed by the official code itself, run on these inputs (it is
not part of egg_eval, and not copied into it):

- VQA: facebookresearch/mmf ``mmf/utils/m4c_evaluators.py`` (b0ffc7f), ``EvalAIAnswerProcessor``
  and ``TextVQAAccuracyEvaluator.eval_pred_list``; LLaVA's ``llava/eval/m4c_evaluator.py`` is the
  same code.
- ANLS: the RRC InfographicVQA / DocVQA script's ``evaluate_method`` (threshold 0.5), per question
  and its overall score.
- POPE: haotian-liu/LLaVA ``llava/eval/eval_pope.py`` (c121f04): the text it rewrites each answer
  to, and its printed accuracy, precision, recall, F1 and yes-ratio.
- GQA: LLaVA's ``scripts/convert_gqa_for_eval.py`` on an answers file, then GQA's official
  ``eval.py`` (``predicted == gold``) on the converted predictions.
"""

from __future__ import annotations

import pytest

from egg_eval.metrics import anls, exact_match, normalize_vqa_answer, pope, pope_parse, vqa_accuracy

VQA = [  # (prediction, the ten human answers, m4c-normalised prediction, accuracy)
    ("Two", ["2", "2", "2", "two", "3", "3", "3", "3", "3", "3"], "2", 1.0),
    ("two dogs", ["2", "2", "2", "two dogs", "two dogs", "3", "3", "3", "3", "3"], "2 dogs", 0.6000000000000001),
    ("The answer.", ["answer", "answer", "an answer", "x", "x", "x", "x", "x", "x", "x"], "answer", 0.9),
    ("5.", ["5", "5", "5", "5", "5", "5", "5", "5", "5", "5"], "5", 1.0),
    ("3.14", ["3.14", "3.14", "3.14", "314", "314", "314", "314", "314", "314", "314"], "3.14", 0.9),
    ("U.S.A.", ["usa", "usa", "u.s.a", "usa", "usa", "usa", "usa", "usa", "usa", "usa"], "usa", 1.0),
    ("1,000", ["1000", "1000", "1,000", "1000", "1000", "1000", "1000", "1000", "1000", "1000"], "1000", 1.0),
    ("dont", ["don't", "don't", "dont", "no", "no", "no", "no", "no", "no", "no"], "don't", 0.9),
    (
        "hello - world",
        ["hello world", "hello world", "hello  world", "x", "x", "x", "x", "x", "x", "x"],
        "hello world",
        0.9,
    ),
    (
        "e-mail",
        ["email", "e mail", "e mail", "e mail", "email", "email", "email", "email", "email", "email"],
        "e mail",
        0.9,
    ),
    ("yes!", ["yes", "yes", "yes", "no", "no", "no", "no", "no", "no", "no"], "yes", 0.9),
    (
        "Coca-Cola's",
        ["coca cola's", "coca cola 's", "coca cola", "cola", "cola", "cola", "cola", "cola", "cola", "cola"],
        "coca cola 's",
        0.6,
    ),
    ("a\tb\nc", ["a b c", "b c", "b c", "b c", "b c", "b c", "b c", "b c", "b c", "b c"], "b c", 1.0),
    ("none", ["0", "0", "0", "none", "none", "none", "none", "none", "none", "none"], "0", 1.0),
    (
        "........................................yes",
        ["yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes"],
        "........yes",
        0.0,
    ),
    (
        "........................................yes",
        ["........yes", "........yes", "........yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes"],
        "........yes",
        0.0,
    ),
    (
        "a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.",
        ["ababababababababababababababababa.b.a.b.a.b.a.b.", "x", "x", "x", "x", "x", "x", "x", "x", "x"],
        "ababababababababababababababababa.b.a.b.a.b.a.b.",
        0.0,
    ),
    (
        "a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.a.b.",
        ["abababababababababababababababababababab", "x", "x", "x", "x", "x", "x", "x", "x", "x"],
        "ababababababababababababababababa.b.a.b.a.b.a.b.",
        0.0,
    ),
    ("20,5", ["205", "20 5", "20,5", "205", "205", "205", "205", "205", "205", "205"], "205", 1.0),
    ("(c)", ["c", "c", "c", "c", "c", "c", "c", "c", "c", "c"], "c", 1.0),
    ("left (c)", ["left c", "left c", "left  c", "c", "c", "c", "c", "c", "c", "c"], "left c", 0.9),
    ("", ["", "", "", "x", "x", "x", "x", "x", "x", "x"], "", 0.9),
    (
        "nike",
        ["nike", "nike", "adidas", "adidas", "adidas", "adidas", "adidas", "adidas", "adidas", "adidas"],
        "nike",
        0.6,
    ),
    ("NIKE", ["nike", "nike", "nike", "nike", "nike", "nike", "nike", "nike", "nike", "nike"], "nike", 1.0),
]
ANLS = [  # (prediction, answers, the RRC score)
    ("12", ["13"], 0.5),
    ("1", ["2"], 0.0),
    ("abc", ["abd"], 0.6666666666666667),
    ("ab", ["abcd"], 0.5),
    ("abcd", ["ab"], 0.5),
    ("New York", ["  new   york  "], 1.0),
    ("  new york", ["New   York"], 1.0),
    ("abc  ", ["abd"], 0.8),
    ("The cat", ["cat"], 0.0),
    ("straße", ["strasse"], 0.7142857142857143),
    ("STRASSE", ["straße"], 0.7142857142857143),
    ("İstanbul", ["istanbul"], 0.875),
    ("", ["abc"], 0.0),
    ("", [""], 1.0),
    ("x", [""], 0.0),
    ("12/05/1998", ["12/05/98", "May 12, 1998"], 0.8),
    ("May 12 1998", ["12/05/98", "May 12, 1998"], 0.9166666666666666),
    ("0.5", ["0.4"], 0.6666666666666667),
    ("$10", ["10"], 0.6666666666666667),
    ("ﬁle", ["file"], 0.5),
]
ANLS_MEAN = 0.5910119047619047  # the RRC 'Overall ANLS' of the table above
POPE_PARSE = [  # (prediction, what eval_pope.py reads it as)
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is not a dog.", "no"),
    ("NO", "yes"),
    ("no", "no"),
    ("No.", "no"),
    ("Yes.", "yes"),
    ("yes", "yes"),
    ("There is no.", "no"),
    ("Nope", "yes"),
    ("I do not see one", "no"),
    ("Yes. No.", "yes"),
    ("The image shows a dog, not a cat.", "no"),
    ("not", "no"),
    ("", "yes"),
    ("no,", "no"),
    ("Yes, no doubt", "no"),
    ("The answer is No", "no"),
    ("1.5 no", "yes"),
]
POPE_PREDICTIONS = [
    "Yes",
    "No",
    "yes, it is",
    "There is no cat.",
    "No",
    "Yes.",
    "no",
    "Yes",
    "not sure",
    "Yes",
    "NO",
    "Yes",
    "no",
]
POPE_LABELS = ["yes", "no", "yes", "yes", "no", "no", "no", "yes", "yes", "no", "no", "yes", "yes"]
POPE_PRINTED = {
    "accuracy": 0.5384615384615384,
    "precision": 0.5714285714285714,
    "recall": 0.5714285714285714,
    "f1": 0.5714285714285714,
    "yes_ratio": 0.5384615384615384,
}
GQA = [  # (raw answer text, gold answer, score after convert_gqa_for_eval.py + eval.py)
    ("yes", "yes", 1.0),
    ("Yes", "yes", 1.0),
    ("Yes.", "yes", 1.0),
    ("yes. ", "yes", 0.0),
    (" yes", "yes", 0.0),
    ("yes ", "yes", 0.0),
    ("Yes..", "yes", 1.0),
    ("traffic  light", "traffic light", 0.0),
    ("Traffic light.", "traffic light", 1.0),
    ("the dog", "dog", 0.0),
    ("dog", "dog", 1.0),
    ("no", "yes", 0.0),
    ("Left", "left", 1.0),
    ("LEFT.", "left", 1.0),
    ("1.", "1", 1.0),
    ("Mr.", "mr.", 0.0),
    ("t-shirt", "t-shirt", 1.0),
    ("T-Shirt", "t-shirt", 1.0),
    ("white\n", "white", 0.0),
]
GQA_ACCURACY = 57.89473684210527  # eval.py's printed accuracy (percent) of the table above


@pytest.mark.parametrize(("prediction", "answers", "normalised", "accuracy"), VQA)
def test_vqa_accuracy_is_m4c_s(prediction, answers, normalised, accuracy):
    assert normalize_vqa_answer(prediction) == normalised
    assert vqa_accuracy(prediction, answers) == pytest.approx(accuracy, abs=1e-12)


def test_m4c_strips_at_most_32_periods():
    # m4c passes re.UNICODE (32) where Pattern.sub takes its count: 40 periods leave 8
    assert normalize_vqa_answer("." * 40 + "yes") == "." * 8 + "yes"


@pytest.mark.parametrize(("prediction", "answers", "score"), ANLS)
def test_anls_is_the_rrc_scorers(prediction, answers, score):
    assert anls(prediction, answers) == pytest.approx(score, abs=1e-12)


def test_anls_mean_is_the_rrc_overall_score():
    assert sum(anls(p, a) for p, a, _ in ANLS) / len(ANLS) == pytest.approx(ANLS_MEAN, abs=1e-12)


@pytest.mark.parametrize(("prediction", "parsed"), POPE_PARSE)
def test_pope_reads_an_answer_as_eval_pope_does(prediction, parsed):
    assert pope_parse(prediction) == parsed


def test_pope_aggregate_is_eval_popes():
    got = pope(POPE_PREDICTIONS, POPE_LABELS)
    assert {k: got[k] for k in POPE_PRINTED} == pytest.approx(POPE_PRINTED, abs=1e-12)
    assert got["n_failed"] == 0


@pytest.mark.parametrize(("text", "answer", "score"), GQA)
def test_gqa_is_llavas_conversion_then_gqas_eval(text, answer, score):
    assert exact_match(text, answer) == score


def test_gqa_accuracy_is_evals():
    assert 100 * sum(exact_match(t, a) for t, a, _ in GQA) / len(GQA) == pytest.approx(GQA_ACCURACY, abs=1e-9)
