"""Benchmark metrics as pure functions, following the official scorers.

- ``vqa_accuracy``: TextVQA's m4c ``TextVQAAccuracyEvaluator`` with the EvalAI answer
  processor (the VQA v2 normalisation applied to prediction and every answer, always).
- ``anls``: the RRC DocVQA / InfographicVQA definition.
- ``pope``: LLaVA's ``eval_pope.py`` answer parsing and counts.
- ``multiple_choice``: a letter parser robust to the usual phrasings (V*, RealWorldQA).
- ``exact_match``: GQA, after LLaVA's conversion (lower case, no trailing period).
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
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI answer processor used by the TextVQA and VQA v2 evaluators."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of min(1, matches / 3)."""
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
    """1 - NL (normalised Levenshtein) against the closest answer, 0 when NL >= threshold."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    p = _anls_norm(prediction)
    best = 0.0
    for a in answers:
        g = _anls_norm(a)
        longest = max(len(p), len(g))
        nl = editdistance.eval(p, g) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ------------------------------------------------------------- multiple choice
LETTERS = "ABCDEFGHIJ"


def _mc_norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_choice(prediction: str, options: Sequence[str] | None = None, letters: str | None = None) -> str | None:
    """The option letter a free-form ``prediction`` names, or ``None`` when it names none.

    Accepts "B", "(B)", "B.", "B) cat", "B. cat", "Answer: B", "The answer is (B)", the
    option's text itself, or a sentence holding exactly one candidate letter on its own.
    """
    letters = letters or LETTERS[: len(options)] if options else (letters or "ABCD")
    text = prediction.strip()
    if not text:
        return None
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = re.search(r"answer(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![\w])", text, flags=re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
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
        padded = f" {norm} "
        hits = {lt for lt, opt in zip(letters, options) if _mc_norm(opt) and f" {_mc_norm(opt)} " in padded}
        if len(hits) == 1:
            return hits.pop()
    found = {x for x in re.findall(r"(?<![\w'])([A-Z])(?![\w'])", text) if x in letters and x != "I"}
    if len(found) == 1:
        return found.pop()
    return None


def multiple_choice(prediction: str, options_or_letters: Sequence[str], answer: str) -> float:
    """1.0 when the prediction names the correct option, else 0.0.

    ``options_or_letters``: the option texts in order (lettered A, B, ...) or the letters;
    ``answer``: the correct letter, or the correct option's text.
    """
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
    """LLaVA eval_pope.py: text before the first '.', commas removed; 'No'/'no'/'not' -> no."""
    text = prediction
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = yes) and the yes-ratio of the PREDICTIONS."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    preds = [pope_parse(p) for p in predictions]
    gold = [str(x).strip().lower() for x in labels]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gold))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
    }


# ------------------------------------------------------------------ GQA, boxes
def _gqa_norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction: str, answer: str) -> float:
    return float(_gqa_norm(prediction) == _gqa_norm(answer))


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
