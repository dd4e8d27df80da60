"""Math word problems: answer extraction and an answer-checking reward, for your own datasets.

Reference solutions in the GSM8K format (Cobbe et al. 2021, "Training Verifiers to Solve Math
Word Problems") end with ``#### <answer>``; model completions give their answer in
``\\boxed{...}`` (the MATH convention, Hendrycks et al. 2021), after ``####``, or as the last
number they write. ``math_answer_reward`` compares the two:

* with the ``math-verify`` package installed (``pip install rlprim[math]``; imported lazily,
  on first use), by ``math_verify.verify(parse(gold), parse(predicted))`` — symbolic
  equivalence of LaTeX and plain expressions;
* otherwise (or when ``math_verify`` fails on an input) by the numeric fallback
  ``parse_number``: thousands commas, ``$``, ``%``, surrounding spaces, a trailing period,
  ``\\frac{a}{b}`` and ``a/b`` fractions, and decimals are understood, and numbers are compared
  exactly as fractions (``"0.5" == "1/2" == "\\frac{1}{2}"``, ``"18.00" == "18"``,
  ``"1,234" == "1234"``). Non-numeric answers are compared as normalised strings.

Turn a GSM8K-style dataset into prompt items with ``make_math_prompt_items``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any

from rlprim.types import Rollout

__all__ = [
    "MATH_PROMPT",
    "extract_hash_answer",
    "extract_boxed_answer",
    "extract_last_number",
    "extract_math_answer",
    "parse_number",
    "math_answers_equal",
    "math_answer_reward",
    "create_math_answer_reward",
    "make_math_prompt_items",
]

MATH_PROMPT = (
    "{question}\nSolve the problem step by step, then give the final answer after '####'."
)
# A number as written in text: sign, $, thousands commas, decimals, an a/b fraction.
_NUMBER_IN_TEXT = re.compile(
    r"-?\$?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
)
_LATEX_FRACTION = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_LATEX_FRACTION_SHORT = re.compile(r"^\\[dt]?frac(\d)(\d)$")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|mathrm|textbf|mathbf)\{(.*)\}$")
_MAX_NUMBER_CHARS = 100


def _check_text(text: object, name: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


def extract_hash_answer(text: str) -> str | None:
    """The answer after the last ``####`` (GSM8K format), stripped; ``None`` if absent/empty.

    Only the rest of that line counts: ``"... #### 72"`` → ``"72"``; ``"#### 1,000\\nmore"`` →
    ``"1,000"``.
    """
    text = _check_text(text)
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
    return answer or None


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), stripped; ``None`` if absent.

    ``"so \\boxed{\\frac{1}{2}}."`` → ``"\\frac{1}{2}"``. An unclosed box gives ``None``.
    ``\\fbox{...}`` counts too.
    """
    text = _check_text(text)
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for position in range(start, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    content = text[start:position].strip()
                    if content:
                        return content
                    break
    return None


def extract_last_number(text: str) -> str | None:
    """The last number written in ``text`` (as written, e.g. ``"$1,234.50"``), or ``None``.

    Recognises integers, thousands commas, decimals, a sign, a ``$`` prefix and ``a/b``.
    ``"I have 3 apples and 12.5 pears."`` → ``"12.5"``.
    """
    text = _check_text(text)
    matches = _NUMBER_IN_TEXT.findall(text)
    return matches[-1] if matches else None


def extract_math_answer(text: str) -> str | None:
    """The final answer of a completion: the last ``\\boxed{}``, else the ``####`` answer, else
    the last number; ``None`` when there is none of these."""
    text = _check_text(text)
    for extract in (extract_boxed_answer, extract_hash_answer, extract_last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


def _strip_decorations(text: str) -> str:
    text = text.strip()
    wrapper = _TEXT_WRAPPER.match(text)
    if wrapper:
        text = wrapper.group(1).strip()
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = text.replace("\\!", "").replace("{,}", ",").replace("\\,", "").replace(" ", "")
    text = text.removeprefix("\\left(").removesuffix("\\right)")
    while text.endswith("."):
        text = text[:-1]
    return text


def _to_fraction(text: str) -> Fraction | None:
    """A plain decimal or integer (thousands commas allowed) as a Fraction."""
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    if "," in text:
        if not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
            return None
        text = text.replace(",", "")
    if not re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", text):
        return None
    return Fraction(text)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a numeric answer, or ``None`` if it is not a plain number.

    Understood (after removing spaces, ``$``, ``\\$``, ``%``, ``\\text{}`` wrappers and
    trailing periods): integers and decimals with an optional sign (``"-3"``, ``"2.50"``,
    ``".5"``), thousands commas (``"1,234,567"``; commas elsewhere are refused, so ``"1,2"``
    is ``None``), fractions ``"3/4"`` and ``"\\frac{3}{4}"`` / ``\\dfrac`` / ``\\tfrac`` /
    ``\\frac34``, with an optional leading sign. Percent signs are dropped, not divided by 100
    (``"50%"`` → 50), as GSM8K writes percentages as plain numbers.

    Returns:
      a ``Fraction`` (``parse_number("0.50") == Fraction(1, 2)``), or ``None``.
    """
    text = _strip_decorations(_check_text(text))
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    sign = 1
    if text[0] in "+-" and text[1:2] == "\\":
        sign, text = (-1 if text[0] == "-" else 1), text[1:]
    latex = _LATEX_FRACTION.match(text) or _LATEX_FRACTION_SHORT.match(text)
    if latex:
        numerator, denominator = (_to_fraction(g.strip()) for g in latex.groups())
    elif text.count("/") == 1:
        numerator, denominator = (_to_fraction(part) for part in text.split("/"))
    else:
        value = _to_fraction(text)
        return None if value is None else sign * value
    if numerator is None or denominator is None or denominator == 0:
        return None
    return sign * numerator / denominator


def _normalise_string(text: str) -> str:
    return _strip_decorations(text).lower()


def _as_latex(text: str) -> str:
    """``text`` between ``$`` delimiters unless it already has some."""
    return text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$"


def _math_verify_equal(expected: str, predicted: str) -> bool | None:
    """``math_verify``'s verdict, or ``None`` when it is not installed or fails on the input."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        # math_verify reads LaTeX only between delimiters; extracted answers are bare.
        gold, answer = parse(_as_latex(expected)), parse(_as_latex(predicted))
        if not gold or not answer:
            return None
        return bool(verify(gold, answer))
    except Exception:  # math_verify raises many kinds on odd input; fall back then.
        return None


def math_answers_equal(
    predicted: str | None, expected: str, use_math_verify: bool | None = None
) -> bool:
    """Whether a predicted answer equals the expected one.

    ::

        math_verify.verify(parse(expected), parse(predicted))    if math_verify is used
        parse_number(predicted) == parse_number(expected)        if both are numbers
        normalised predicted == normalised expected              otherwise

    (normalised: spaces, ``$``, ``%``, ``\\text{}`` and trailing periods removed, lowercase).

    Args:
      predicted: the model's answer (``None``: no answer, never equal).
      expected: the reference answer.
      use_math_verify: ``None`` uses ``math_verify`` when it is installed; ``True`` requires
        it (ImportError otherwise); ``False`` always uses the fallback. When ``math_verify``
        fails on an input, the fallback decides.

    Returns:
      ``True`` or ``False``.
    """
    _check_text(expected, "expected")
    if predicted is None:
        return False
    _check_text(predicted, "predicted")
    if use_math_verify not in (None, True, False):
        raise TypeError(f"use_math_verify must be None, True or False, got {use_math_verify!r}")
    if use_math_verify is True:
        try:
            import math_verify  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "use_math_verify=True needs the math-verify package: pip install rlprim[math]"
            ) from error
    if use_math_verify is not False:
        verdict = _math_verify_equal(expected, predicted)
        if verdict is not None:
            return verdict
    expected_value, predicted_value = parse_number(expected), parse_number(predicted)
    if expected_value is not None and predicted_value is not None:
        return expected_value == predicted_value
    return _normalise_string(predicted) == _normalise_string(expected)


def _reference_answer(value: object) -> str:
    """The reference answer of a metadata value: the ``####`` part of a solution, if any."""
    text = str(value)
    answer = extract_hash_answer(text)
    return answer if answer is not None else text.strip()


def create_math_answer_reward(
    answer_key: str = "answer",
    extract_fn: Callable[[str], str | None] = extract_math_answer,
    use_math_verify: bool | None = None,
    reward: float = 1.0,
    penalty: float = 0.0,
) -> Callable[[Rollout], float]:
    """Builds ``reward_fn(rollout)``: ``reward`` if the completion's answer is right, else
    ``penalty``.

    ::

        expected  = rollout.metadata[answer_key]    (its "#### x" part if it is a full solution)
        predicted = extract_fn(rollout.generation.text)
        r = reward if math_answers_equal(predicted, expected, use_math_verify) else penalty

    The verifiable-answer reward of RLVR (Lambert et al. 2024, "Tülu 3") and DeepSeek-R1
    (Guo et al. 2025).

    Args:
      answer_key: the metadata key of the reference answer (or full GSM8K solution).
      extract_fn: ``fn(completion_text) -> answer | None``; default ``extract_math_answer``.
      use_math_verify: see ``math_answers_equal``.
      reward / penalty: the two values.

    Returns:
      ``reward_fn(rollout) -> float``; it raises ValueError when the metadata lacks
      ``answer_key`` (the keys present are listed).
    """
    if not isinstance(answer_key, str):
        raise TypeError(f"answer_key must be a str, got {type(answer_key).__name__}")
    if not callable(extract_fn):
        raise TypeError(f"extract_fn must be callable, got {type(extract_fn).__name__}")
    if use_math_verify not in (None, True, False):
        raise TypeError(f"use_math_verify must be None, True or False, got {use_math_verify!r}")
    for name, value in (("reward", reward), ("penalty", penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    reward, penalty = float(reward), float(penalty)

    def reward_fn(rollout: Rollout) -> float:
        """``reward`` if the extracted answer equals the reference answer, else ``penalty``."""
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
        metadata: Mapping[str, Any] = rollout.metadata or {}
        if answer_key not in metadata:
            raise ValueError(
                f"rollout.metadata has no key {answer_key!r} holding the reference answer; "
                f"keys: {sorted(map(str, metadata))}"
            )
        expected = _reference_answer(metadata[answer_key])
        predicted = extract_fn(rollout.generation.text)
        equal = math_answers_equal(predicted, expected, use_math_verify)
        return reward if equal else penalty

    return reward_fn


def math_answer_reward(rollout: Rollout) -> float:
    """``create_math_answer_reward()``'s reward: 1.0 if the completion's final answer equals
    ``rollout.metadata["answer"]`` (``math_verify`` when installed, else the numeric
    fallback), else 0.0."""
    return create_math_answer_reward()(rollout)


def make_math_prompt_items(
    records: Iterable[Mapping[str, Any]],
    question_key: str = "question",
    answer_key: str = "answer",
    prompt_template: str = MATH_PROMPT,
) -> list[dict[str, Any]]:
    """Prompt items ``{"prompt", "answer", "solution"}`` from GSM8K-style records.

    ``prompt = prompt_template.format(question=record[question_key])``; ``answer`` is the
    ``####`` part of ``record[answer_key]`` (the whole value, stripped, when it has none);
    ``solution`` keeps the full reference text. Works on a list of dicts or a Hugging Face
    ``datasets.Dataset`` (any iterable of mappings).
    """
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(f"records must be an iterable of mappings, got {type(records).__name__}")
    if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
        raise ValueError(
            f"prompt_template must be a str containing '{{question}}', got {prompt_template!r}"
        )
    items = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"records[{i}] must be a mapping, got {type(record).__name__}")
        for key in (question_key, answer_key):
            if key not in record:
                raise ValueError(f"records[{i}] has no key {key!r}; keys: {sorted(record)}")
        solution = str(record[answer_key])
        items.append(
            {
                "prompt": prompt_template.format(question=record[question_key]),
                "answer": _reference_answer(solution),
                "solution": solution,
            }
        )
    return items
