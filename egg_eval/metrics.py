"""Benchmark metrics as pure functions, equal case for case to the official scorers.

- ``vqa_accuracy``: TextVQA's m4c ``TextVQAAccuracyEvaluator`` with its ``EvalAIAnswerProcessor``
  (facebookresearch/mmf ``mmf/utils/m4c_evaluators.py``; LLaVA's ``llava/eval/m4c_evaluator.py``
  is the same code), applied to the prediction and to every human answer.
- ``anls``: the Robust Reading Competition's DocVQA / InfographicVQA scorer (``evaluate_method``).
- ``pope``: LLaVA's ``llava/eval/eval_pope.py`` answer parsing and counts.
- ``exact_match``: GQA as LLaVA scores it: ``scripts/convert_gqa_for_eval.py`` then GQA's official
  ``eval.py`` (``predicted == gold``).
- ``multiple_choice``: a letter parser for V* and RealWorldQA (no official scorer parses free text;
  naming the option by its text counts, beyond the peers).

Where an official scorer has a quirk, it is kept on purpose and said at that line ("quirk kept"):
the numbers are meant to be the ones its authors' code prints. Tables of cases whose expected
values come from running that code are in ``tests/test_official_scorers.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise

import editdistance

# ---------------------------------------------------------------- VQA accuracy
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # quirk kept: "(?!<=" is a lookahead, as m4c writes it
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# m4c passes re.UNICODE (== 32) as the third positional argument of Pattern.sub, which is
# ``count``: at most 32 periods are stripped. Quirk kept.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # the condition looks at the text as it came in, not as replaced so far (as m4c does)
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """m4c's ``EvalAIAnswerProcessor``: ``word_tokenize``, tabs and newlines to spaces, the
    punctuation rule, number words to digits, articles dropped, contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """m4c's ``TextVQAAccuracyEvaluator``: the mean over the leave-one-out subsets of the human
    answers of min(1, matches / 3). m4c asserts ten answers; any number is taken here (the
    same formula over n subsets)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# ------------------------------------------------------------------------ ANLS
def _anls_norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """The RRC scorer: 1 - NL against the closest answer, 0 when that is below ``threshold``.

    NL = Levenshtein(normalised answer, normalised prediction) / max(len(answer.upper()),
    len(prediction.upper())): the distance is taken between the lower-cased, whitespace-collapsed
    strings, but it is divided by the lengths of the strings AS GIVEN, upper-cased (quirk kept:
    surrounding spaces lengthen the divisor, "ß".upper() is two characters). A score of exactly
    ``threshold`` is kept (the official test is ``score < threshold``): "12" for "13" scores 0.5.
    Both empty: NL 0."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    p = _anls_norm(prediction)
    nls = []
    for a in answers:
        length = max(len(a.upper()), len(prediction.upper()))
        nls.append(0.0 if length == 0 else editdistance.eval(_anls_norm(a), p) / length)
    score = 1 - min(nls)
    return 0.0 if score < threshold else score


# ------------------------------------------------------------- multiple choice
LETTERS = "ABCDEFGHIJ"


def _mc_norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _named_options(norm: str, letters: str, options: Sequence[str]) -> set[str]:
    """The letters of the options whose text occurs in ``norm`` as whole words; an option whose
    text lies inside another named option's ("red" in "dark red") is not named by itself."""
    padded = f" {norm} "
    texts = {lt: _mc_norm(o) for lt, o in zip(letters, options) if _mc_norm(o)}
    hits = {lt for lt, t in texts.items() if f" {t} " in padded}
    return {lt for lt in hits if not any(o != lt and f" {texts[lt]} " in f" {texts[o]} " for o in hits)}


def _lone_letters(text: str, letters: str) -> set[str]:
    """Capital letters standing alone in ``text`` that are option letters; not "I", and not the
    article "A" before a lower-case word other than a verb ("A dog is ..." names no letter, "A is
    right" does)."""
    found = set()
    for m in re.finditer(r"(?<![\w'])([A-Z])(?![\w'])", text):
        x = m.group(1)
        article = x == "A" and re.match(r"\s+[a-z]", text[m.end() :]) and not _VERB.match(text[m.end() :])
        if x in letters and x != "I" and not article:
            found.add(x)
    return found


_VERB = re.compile(r"\s+(?:is|was|seems|looks|appears|would|could|should|might|must|will|can)\b")


def parse_choice(prediction: str, options: Sequence[str] | None = None, letters: str | None = None) -> str | None:
    """The option letter a free-form ``prediction`` names, or ``None`` when it names none or
    several.

    Letters first: "B", "(B)", "B.", "Answer: B", "The answer is (B)", "option B", "B) cat",
    "B. cat". Then the options' texts (when given): the prediction is one option's text, or names
    exactly one option's text among its words ("The jacket is blue." -> the option "blue"); one
    naming several scores as none. Last, a sentence holding exactly one candidate letter on its
    own, not the article "A" before a word ("I pick C." -> C; "A dog." -> none)."""
    letters = letters or LETTERS[: len(options)] if options else (letters or "ABCD")
    text = prediction.strip()
    if not text:
        return None
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    # the letter in capitals: "the answer is a red car" names no letter
    m = re.search(r"\b(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:：]?\s*\(?([A-Z])\)?(?![\w])", text)
    if m and m.group(1) in letters:
        return m.group(1)
    norm = _mc_norm(text)
    if options:
        for letter, opt in zip(letters, options):
            if norm == _mc_norm(opt):
                return letter
    m = re.match(r"\(([A-Z])\)|([A-Z])[.:)](?:\s|$)", text)
    if m:
        letter = m.group(1) or m.group(2)
        if letter in letters:
            return letter
    if options:
        named = _named_options(norm, letters, options)
        if len(named) == 1:
            return named.pop()
        if named:  # several options named: no answer, not a lucky guess
            return None
    found = _lone_letters(text, letters)
    if len(found) == 1:
        return found.pop()
    return None


def multiple_choice(prediction: str, options_or_letters: Sequence[str], answer: str) -> float:
    """1.0 when the prediction names the correct option (:func:`parse_choice`), else 0.0.

    ``options_or_letters``: the option texts in order (lettered A, B, ...) or only the letters;
    ``answer``: the correct letter, or the correct option's text."""
    is_letters = all(len(o) == 1 and o.isalpha() for o in options_or_letters)
    options = None if is_letters else list(options_or_letters)
    letters = "".join(o.upper() for o in options_or_letters) if is_letters else LETTERS[: len(options_or_letters)]
    gold = answer.strip().strip("()").upper() if len(answer.strip().strip("()")) == 1 else None
    if gold is None and options:
        gold = next((lt for lt, o in zip(letters, options) if _mc_norm(o) == _mc_norm(answer)), None)
    if gold is None:
        raise ValueError(f"answer {answer!r} is neither a letter nor one of the options")
    return float(parse_choice(prediction, options, letters) == gold)


# ------------------------------------------------------------------------ POPE
def pope_parse(prediction: str) -> str:
    """``eval_pope.py``: the text before the first '.', commas removed, split on single spaces;
    'No', 'no' or 'not' among the words -> no, else yes (quirks kept: "NO" and "" are yes,
    "1.5 no" is yes since only "1" is left)."""
    text = prediction
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_label(label: str) -> str:
    """``eval_pope.py`` reads a label 'no' as no and any other as yes."""
    return "no" if label == "no" else "yes"


def pope(predictions: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = yes) and the yes-ratio of the PREDICTIONS,
    counted as ``eval_pope.py`` counts them.

    A prediction of ``None`` (a sample that failed) is wrong in every count: the answer opposite
    to its label (a false negative under 'yes', a false positive under 'no'), and it is left out
    of the yes-ratio, which covers the answered samples only (``n_failed`` says how many).
    Precision, recall or F1 with an empty denominator are 0.0 where the official code divides by
    zero."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    gold = [pope_label(x) for x in labels]
    preds = [pope_parse(p) if p is not None else ("no" if g == "yes" else "yes") for p, g in zip(predictions, gold)]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gold))
    n = len(preds)
    answered = [pope_parse(p) for p in predictions if p is not None]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in answered) / len(answered) if answered else 0.0,
        "n_failed": n - len(answered),
    }


# ------------------------------------------------------------------ GQA, boxes
def exact_match(prediction: str, answer: str) -> float:
    """GQA as LLaVA scores it: ``convert_gqa_for_eval.py`` writes ``text.rstrip('.').lower()``
    (periods stripped before lower-casing, no whitespace stripped), then GQA's ``eval.py`` tests
    ``predicted == gold`` on the gold answer as it is. The answer text is stripped when it is
    decoded (as LLaVA's ``model_vqa_loader`` strips it), so "Yes." and "yes" match "yes" while
    "the dog" does not match "dog"."""
    return float(prediction.rstrip(".").lower() == answer)


def free_form_match(prediction: str, answer: str) -> float:
    """1.0 when ``prediction`` equals ``answer`` after the VQA normalisation (case,
    punctuation, articles, number words -> digits): "Three." matches "3", "yes" "Yes".
    RealWorldQA's questions without options ("Please answer directly with a single word or
    number.") are scored so."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def region_localisation(region: Sequence[float], boxes: Sequence[Sequence[float]]) -> dict[str, float]:
    """``iou``: IoU of ``region`` with the best-matching of ``boxes``; ``hit``: 1.0 when that
    box's centre lies inside ``region`` (all ``[x0, y0, x1, y1]``; ``boxes`` non-empty)."""
    ious = [box_iou(region, b) for b in boxes]
    best = boxes[max(range(len(ious)), key=ious.__getitem__)]
    cx, cy = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
    return {"iou": max(ious), "hit": float(region[0] <= cx <= region[2] and region[1] <= cy <= region[3])}


def best_grid_iou(xs: Sequence[float], ys: Sequence[float], box: Sequence[float]) -> float:
    """The highest IoU with ``box`` of any box whose sides lie on the grid lines ``xs`` and
    ``ys``: the ceiling for a region built from whole token cells (a first-round region)."""
    xs, ys = sorted(set(xs)), sorted(set(ys))
    return max(
        box_iou((x0, y0, x1, y1), box)
        for i, x0 in enumerate(xs)
        for x1 in xs[i + 1 :]
        for j, y0 in enumerate(ys)
        for y1 in ys[j + 1 :]
    )


def grid_cover_ious(xs: Sequence[float], ys: Sequence[float], box: Sequence[float]) -> dict[str, float]:
    """IoU with ``box`` of two boxes of whole cells of the grid with lines ``xs`` and ``ys``:
    ``touched``, around every cell that overlaps ``box``; ``centred``, around the cells whose
    centre lies inside it (0.0 when there is none)."""
    xs, ys = sorted(set(xs)), sorted(set(ys))

    def cover(lines, lo, hi):
        cells = list(pairwise(lines))
        touched = [c for c in cells if c[1] > lo and c[0] < hi]
        centred = [c for c in cells if lo <= (c[0] + c[1]) / 2 < hi]
        return [(s[0][0], s[-1][1]) if s else None for s in (touched, centred)]

    out = {}
    for name, bx, by in zip(("touched", "centred"), cover(xs, box[0], box[2]), cover(ys, box[1], box[3])):
        out[name] = box_iou((bx[0], by[0], bx[1], by[1]), box) if bx and by else 0.0
    return out
