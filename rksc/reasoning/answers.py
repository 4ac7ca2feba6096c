"""Answer extraction from generated text, and normalisation so answers compare as strings.

Numbers (GSM8K, MATH): "The answer is X", then `\\boxed{X}`, then "#### X", then the last number.
Multiple choice: "The answer is (C)" / "Answer: C", then the last standalone option letter.
"""

from __future__ import annotations

import re

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(?:\\\(|\$)?\s*(?:\\boxed\{)?\s*(" + _NUM + ")", re.I)
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_ANY_NUM = re.compile(_NUM)
_CHOICE_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(?:option\s*)?\(?([A-J])\b\)?", re.I)
_CHOICE_ANY = re.compile(r"(?:^|[\s(])([A-J])(?:[).:]|\s*$)", re.M)
_CHOICE_LINE = re.compile(r"^\s*\(?([A-J])[).:]\s+\S", re.M)


def normalize_number(text: str) -> str | None:
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    if "/" in s:
        num, _, den = s.partition("/")
        try:
            value = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return None
    else:
        try:
            value = float(s)
        except ValueError:
            return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_number(text: str) -> str | None:
    for pattern in (_ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    inner = boxed(text)
    if inner is not None:
        nums = _ANY_NUM.findall(inner)
        if nums:
            return normalize_number(nums[-1])
    nums = _ANY_NUM.findall(text)
    return normalize_number(nums[-1]) if nums else None


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    found = [c.upper() for c in _CHOICE_IS.findall(text) if c.upper() in letters]
    if found:
        return found[-1]
    inner = boxed(text)
    if inner and inner.strip().strip("()").upper() in letters and len(inner.strip().strip("()")) == 1:
        return inner.strip().strip("()").upper()
    found = [c for c in _CHOICE_ANY.findall(text) if c in letters]
    return found[-1] if found else None


def choice_letters(question: str) -> str:
    """Option letters listed in a question ('A'..'E' lines), or '' when it is not multiple choice."""
    letters = sorted(set(_CHOICE_LINE.findall(question)))
    return "".join(letters) if len(letters) >= 2 else ""


def answer_kind(question: str) -> str:
    return "choice" if choice_letters(question) else "number"


def extract(text: str, kind: str, letters: str = "ABCDE") -> str | None:
    return extract_choice(text, letters) if kind == "choice" else extract_number(text)


def gsm8k_gold(answer: str) -> str | None:
    """The reference answer of a GSM8K solution (the text after '####')."""
    found = _HASHES.findall(answer)
    return normalize_number(found[-1]) if found else None


def same_answer(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    na, nb = normalize_number(a), normalize_number(b)
    if na is not None and nb is not None:
        return na == nb
    return a.strip().upper() == b.strip().upper()
