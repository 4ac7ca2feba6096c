"""Answer extraction from generated text, and normalisation so answers compare as strings.

Numbers (GSM8K, MATH): "The answer is X", then `\\boxed{X}`, then "#### X", then the last number.
Multiple choice: "The answer is (C)" / "Answer: C", then the last standalone option letter.
"""

from __future__ import annotations

import decimal
import math
import re

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(?:\\\(|\$)?\s*(?:\\boxed\{)?\s*(" + _NUM + ")", re.I)
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_ANY_NUM = re.compile(_NUM)
_CHOICE_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(?:option\s*)?\(?([A-J])\b\)?", re.I)
_CHOICE_ANY = re.compile(r"(?:^|[\s(])([A-J])(?:[).:]|\s*$)", re.M)
CHOICE_LINE = re.compile(r"^\s*\(?([A-J])[).:]\s+\S", re.M)
_WIDE = decimal.Context(prec=28, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def normalize_number(text: str) -> str | None:
    """Canonical text of a number ("1,200.00" -> "1200", "3/4" -> "0.75"), or None when `text` is
    not a finite number. Never raises: numbers past the float range (309+ digits, "1e999") are
    formatted from their exact decimal value; "inf" and "nan" are not numbers."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    num, slash, den = s.partition("/")
    if slash and not den:
        return None
    try:
        top, bottom = float(num), float(den) if slash else 1.0
        value = top / bottom
    except (ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(top) and math.isfinite(bottom) and math.isfinite(value)):
        return _normalize_huge(num, den if slash else "1")
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _normalize_huge(num: str, den: str) -> str | None:
    """A number or fraction beyond the float range, computed in decimal with an exponent that
    cannot overflow; same format as normalize_number's float path."""
    try:
        with decimal.localcontext(_WIDE) as ctx:
            top, bottom = decimal.Decimal(num), decimal.Decimal(den)
            if not (top.is_finite() and bottom.is_finite()) or bottom == 0:
                return None
            value = ctx.divide(top, bottom)
    except (decimal.InvalidOperation, ValueError, ArithmeticError):
        return None
    if not value.is_finite():
        return None
    if value.is_zero() or value.adjusted() < -300:
        return "0"  # as the float path: underflow reads as zero
    if abs(value) < 10**15 and value == value.to_integral_value():
        return str(int(value))
    with decimal.localcontext(_WIDE) as ctx:
        ctx.prec = 6
        return f"{ctx.plus(value).normalize(ctx):g}"  # 6 significant digits, no trailing zeros


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
    """Option letters listed in a question ("A. ..." lines from A on, without gaps), or '' when
    it is not multiple choice. A stray "I. ..." statement line is not taken for option I."""
    found, letters = set(CHOICE_LINE.findall(question)), ""
    for letter in "ABCDEFGHIJ":
        if letter not in found:
            break
        letters += letter
    return letters if len(letters) >= 2 else ""


def answer_kind(question: str) -> str:
    return "choice" if choice_letters(question) else "number"


_MATH_IS = re.compile(r"answer is[:\s]*\$?(.+?)\$?\.?\s*$", re.I | re.M)


def normalize_math(text: str) -> str:
    """Light LaTeX normalisation so equal answers usually compare equal (not a CAS)."""
    s = text.strip().strip("$").rstrip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("dfrac", "frac"),
                     ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), (" ", "")):
        s = s.replace(old, new)
    number = normalize_number(s)
    return number if number is not None else s


def extract_math(text: str) -> str | None:
    inner = boxed(text)
    if inner is None:
        found = _MATH_IS.findall(text)
        inner = found[-1] if found else None
    return normalize_math(inner) if inner else None


def extract(text: str, kind: str, letters: str = "ABCDE") -> str | None:
    if kind == "choice":
        return extract_choice(text, letters)
    return extract_math(text) if kind == "math" else extract_number(text)


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
    if len(a.strip()) == 1 and len(b.strip()) == 1:  # option letters
        return a.strip().upper() == b.strip().upper()
    return normalize_math(a) == normalize_math(b)
