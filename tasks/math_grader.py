"""
The MATH grader: is the final \\boxed{} answer of a model's text equal to the gold answer?
eval.py's MATH-500 verdict and grpo.py's reward are this one function (math_reward), so the
RL stage and its benchmark cannot disagree.
"""
import re
from fractions import Fraction

def extract_boxed(text):
    r"""The content of the last \boxed{...} (or \fbox{...}) in text, braces matched, or None.
    MATH's solutions also write a one-token answer as "\boxed 5"."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)  # \{ and \} come in pairs too
        if depth == 0:
            return text[i + 1:j]
    return None  # never closed: the output was cut off


def normalize_answer(s):
    r"""An answer in a canonical string form. The steps of the MATH dataset's own
    normalisation (Hendrycks et al. 2021, is_equiv), plus units after a number, \text{}
    wrappers, thousands separators and a trailing ".0", so that the ways of writing one
    answer that a grader should accept compare equal:
      \dfrac, \tfrac -> \frac; \frac12 -> \frac{1}{2}; 3/4 -> \frac{3}{4}; \sqrt3 -> \sqrt{3}
      \left( -> (; no spaces, $, \%, degrees, \! \, \; spacing or line breaks
      "x = 5" -> 5 (a name of at most two characters before one "=")
      "5\text{ cm}" -> 5; \text{Evelyn} -> Evelyn; 1,000 -> 1000; 5.0 -> 5; .5 -> 0.5"""
    s = s.strip().replace("\n", "")
    for spacing in ("\\!", "\\,", "\\;", "\\:"):
        s = s.replace(spacing, "")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # units: what follows "\text{ " (MATH's rule), or a \text{word} right after a number
    s = re.split(r"\\(?:text|mbox)\{ ", s)[0]
    s = re.sub(r"^(-?[\d.,]+)\s*\\(?:text|mbox)\{[a-zA-Z ]+\}$", r"\1", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    name, equals, value = s.partition("=")
    if equals and len(name.strip()) <= 2 and "=" not in value:
        s = value
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).replace(" ", "")
    brace = lambda arg: arg if arg.startswith("{") else "{" + arg + "}"
    s = re.sub(r"\\frac(\{[^{}]*\}|\w)(\{[^{}]*\}|\w)", lambda m: "\\frac" + brace(m[1]) + brace(m[2]), s)
    s = re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return re.sub(r"^(-?\d+)\.0+$", r"\1", s)


def as_rational(s):
    """A normalised answer's exact value if it is a plain number: an integer, a decimal or \\frac{a}{b}."""
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return Fraction(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m and int(m[3]):
        return (-1 if m[1] else 1) * Fraction(int(m[2]), int(m[3]))
    return None


def math_equal(pred, gold):
    """Whether a predicted answer (None: there was none) equals the gold one: the same string
    after normalize_answer, or the same number (0.5 and \\frac{1}{2}, exactly)."""
    if pred is None:
        return False
    pred, gold = normalize_answer(pred), normalize_answer(gold)
    return pred == gold or as_rational(pred) is not None and as_rational(pred) == as_rational(gold)


def math_reward(completion_text, answer):
    """1.0 if the completion's last \\boxed{} answer equals `answer`, else 0.0: MATH-500's
    verdict, and grpo.py's reward, so the RL stage and its benchmark cannot disagree."""
    return float(math_equal(extract_boxed(completion_text), answer))


def grade_math(problem, text):
    boxed = extract_boxed(text)
    return {"boxed": boxed}, {"pass@1": float(math_equal(boxed, problem.answer))}
