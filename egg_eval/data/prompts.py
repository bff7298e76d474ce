"""The paper's prompts (Appendix G) and the options a multiple-choice question lists."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egg_eval.data.benchmarks import Sample

OPEN_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."

# a dataset's own answering instruction at the end of its question text (RealWorldQA's:
# "Please answer directly with only the letter of the correct option and nothing else." and
# "Please answer directly with a single word or number."); the paper's prompt replaces it
_OWN_INSTRUCTION = re.compile(r"\s*Please answer directly\b[^\n]*$", re.IGNORECASE)


def option_letters(question: str) -> list[str]:
    """The option letters listed in a question's text: one option per line ("A. ...",
    "(B) ...", "C) ..."), else in a run ("... (A) red (B) blue")."""
    per_line = re.findall(r"(?m)^\s*\(?([A-J])[).]\s", question)
    if per_line:
        return per_line
    inline = re.findall(r"\(([A-J])\)\s", question)
    return inline if inline[:2] == ["A", "B"] else []


def is_free_form(sample: Sample) -> bool:
    """A multiple-choice benchmark's question without options (RealWorldQA has some): no
    options column and none listed in its text. For scoring, :func:`scored_as_text` also
    looks at the answer."""
    return not sample.options and not option_letters(sample.question)


def scored_as_text(sample: Sample) -> bool:
    """A free-form question (:func:`is_free_form`) whose answer is not a lone letter: scored by
    its text. A lone-letter answer keeps letter scoring (options in a layout not recognised)."""
    gold = sample.answers[0].strip().strip("()") if sample.answers else ""
    return is_free_form(sample) and not (len(gold) == 1 and gold.isalpha())


def prompt_for(sample: Sample, kind: str, protocol: str = "generate") -> str:
    """The paper's Appendix G prompts (the chat template is applied by the backbone): the
    question, for multiple choice its options, then the paper's instruction in place of the
    dataset's own. A multiple-choice benchmark's question without options gets the open-ended
    instruction. ``protocol="likelihood"``: the question and its "(A) ..." option lines only,
    which the likelihood answer splits into the stem the model is asked and the options it scores."""
    q = _OWN_INSTRUCTION.sub("", sample.question.strip())
    if protocol == "likelihood":
        if sample.options:
            q += "\n" + "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(sample.options))
        return q
    if kind == "mc" and not is_free_form(sample):
        if sample.options and not re.search(r"\(A\)", q):
            q += "\n" + "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(sample.options))
        return f"{q}\n{MC_SUFFIX}" if MC_SUFFIX.lower() not in q.lower() else q
    return f"{q}\n{OPEN_SUFFIX}"


def split_options(text: str) -> tuple[str, list[str], list[str]]:
    """``(stem, letters, option texts)`` of a multiple-choice prompt with "(A) cat" or "A. cat"
    lines; the stem is the text before the first option line (suffix lines dropped)."""
    stem, letters, options = [], [], []
    for line in text.splitlines():
        m = re.match(r"^\s*\(?([A-Z])[).]\s+(.+?)\s*$", line)
        if m and (not letters or ord(m.group(1)) == ord(letters[-1]) + 1):
            letters.append(m.group(1))
            options.append(m.group(2))
        elif not letters:
            stem.append(line)
    return "\n".join(stem).strip(), letters, options
