r"""The MATH grader (tasks/math_grader.py), eval.py's MATH-500 verdict and grpo.py's reward.

- A case for each rule of the grader's docstring, and MATH_CASES, the table a string-normalising
  grader was held to: every answer judged right there is still judged right.
- Rates over MATH-style outputs: gold answers written here in the styles of MATH-500's (integers,
  fractions, radicals, intervals, tuples, matrices, expressions, words, degrees, percents, bases),
  each rewritten as a model writes it (double braces, reordered terms, \cdot, thousands
  separators, base subscripts, letter choices, units, spaces; wrong answers; hedges). Equivalent rewritings are
  accepted on >= 97%, exact answers on 100%, hedges on <= 1%, wrong answers never.
- math-verify (HF's grader, when installed) as an independent reference on the same outputs.
- Bounded time: pathological outputs get their verdict in well under a second, in any thread.

`python tests/test_math_grader.py` prints the rates table of docs/grader.md: with --math_verify,
math-verify's column beside it; with --deepscaler DIR, DeepScaleR's, from a copy of rllm in DIR.
"""
import functools
import importlib.util
import random
import re
import signal
import sys
import threading
import time
import warnings
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks import math_grader  # noqa: E402
from tasks.math_grader import extract_boxed, math_equal, math_reward  # noqa: E402

# ----------------------------------------------------------------------------- the rules, one case each

# (rule of the docstring, model output, gold answer, verdict)
RULE_CASES = [
    (1, "First $\\boxed{3}$; no, $\\boxed{4}$.", "4", True),
    (1, "First $\\boxed{3}$; no, $\\boxed{4}$.", "3", False),
    (1, "so the answer is $\\boxed{\\frac{3}{4}", "\\frac{3}{4}", False),  # cut off
    (2, "$\\boxed{\\frac{14}{3} \\text{ or } 15}$", "\\frac{14}{3}", False),
    (2, "$\\boxed{15 \\text{ or } \\frac{14}{3}}$", "\\frac{14}{3}", False),
    (2, "$\\boxed{3, 4}$", "3", False),
    (2, "$\\boxed{3 and 4}$", "3", False),
    (2, "$\\boxed{x = 3 \\text{ or } x = -3}$", "-3, 3", True),
    (2, "$\\boxed{1, -2}$", "-2, 1", True),
    (2, "$\\boxed{1, 1}$", "1", False),
    (3, "$\\boxed{{9}}$", "9", True),
    (3, "$\\boxed{\\left( 2, \\dfrac{1}{2} \\right)}$", "(2,\\frac12)", True),
    (3, "$\\boxed{2{,}220}$", "2220", True),
    (3, "$\\boxed{10,\\!000}$", "10000", True),
    (3, "$\\boxed{\\pi r^2}$", "\\pi   r^2", True),
    (3, "$\\boxed{\\text{Devon}}$", "Devon", True),
    (4, "$\\boxed{5cm}$", "5", True),
    (4, "$\\boxed{6\\sqrt{2}\\text{ cm}^2}$", "6\\sqrt2", True),
    (4, "$\\boxed{12 apples}$", "12\\text{ apples}", True),
    (4, "$\\boxed{12 apples}$", "12", False),  # not a unit word, and the gold does not say apples
    (5, "$\\boxed{52_{8}}$", "52_8", True),
    (5, "$\\boxed{C}$", "\\text{(C)}", True),
    (5, "$\\boxed{3/4}$", "\\frac34", True),
    (5, "$\\boxed{\\text{monday}}$", "\\text{Monday}", True),
    (6, "$\\boxed{k = 7}$", "7", True),
    (6, "$\\boxed{x \\in [1, 2)}$", "[1,2)", True),
    (6, "$\\boxed{10 = 5}$", "5", False),
    (6, "$\\boxed{2x - y + 3z = -8}$", "2x - y + 3z + 8 = 0", True),
    (7, "$\\boxed{[1, 2]}$", "(1,2)", False),
    (7, "$\\boxed{1, 2}$", "(1,2)", False),
    (7, "$\\boxed{(1, 2]}$", "(1,2)", False),
    (7, "$\\boxed{\\{3, 1, 2\\}}$", "\\{1,2,3\\}", True),
    (7, "$\\boxed{\\{3, 1, 2\\}}$", "1,2,3", True),  # the set of all solutions, which MATH writes as a list
    (7, "$\\boxed{1, 2}$", "\\{1,2,3\\}", False),
    (7, "$\\boxed{(3, \\infty) \\cup (-\\infty, 1)}$", "(-\\infty,1)\\cup(3,\\infty)", True),
    (7, "$\\boxed{\\begin{bmatrix} 1 & 0 \\\\ 0 & 2 \\end{bmatrix}}$", "\\begin{pmatrix}1&0\\\\0&2\\end{pmatrix}", True),
    (7, "$\\boxed{\\begin{pmatrix} 1 & 0 & 0 & 2 \\end{pmatrix}}$", "\\begin{pmatrix}1&0\\\\0&2\\end{pmatrix}", False),
    (7, "$\\boxed{42}$", "52_8", False),  # 52_8 is 42, but the question asks for base 8
    (8, "$\\boxed{\\frac{2}{4}}$", "0.5", True),
    (8, "$\\boxed{2\\frac{1}{2}}$", "\\frac52", True),
    (8, "$\\boxed{0.33}$", "\\frac13", False),
    (8, "$\\boxed{10^{30} + 1}$", "10^{30}", False),
    (8, "$\\boxed{-5i + 6}$", "6 - 5i", True),
    (8, "$\\boxed{3 \\cdot \\sqrt{13}}$", "3\\sqrt{13}", True),
    (8, "$\\boxed{(x+1)^2}$", "x^2 + 2x + 1", True),
    (8, "$\\boxed{(x+1)^2}$", "x^2 + x + 1", False),
    (8, "$\\boxed{\\sqrt[3]{-8}}$", "-2", True),
    (8, "$\\boxed{1.414}$", "\\sqrt2", False),
    (8, "$\\boxed{\\text{no}}$", "\\text{on}", False),  # words are not products of letters
    (9, "$\\boxed{2^{2^{2^{100}}}}$", "0", False),
    (9, "$\\boxed{" + "1+" * 600 + "1}$", "601", False),  # over MAX_CHARS: wrong unread
]


@pytest.mark.parametrize("rule, output, gold, verdict", RULE_CASES)
def test_rule(rule, output, gold, verdict):
    assert math_reward(output, gold) == float(verdict)


def test_every_rule_has_a_case():
    rules = re.findall(r"^ (\d)\. ", math_grader.__doc__, re.M)
    assert rules == [str(n) for n in range(1, len(rules) + 1)]
    assert {str(rule) for rule, *_ in RULE_CASES} == set(rules)


# (model output, gold answer, verdict): each verdict argued. The grader's table before it
# compared values; every verdict still holds.
MATH_CASES = [
    # the plain case
    ("So the sum is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}", True),
    # nested braces: the box closes at the brace matching its own, not at the first "}"; the
    # gold's \sqrt3 is LaTeX shorthand for \sqrt{3}
    ("Hence $\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt3}{2}", True),
    ("$\\boxed{\\{1, 2\\}}$", "\\{1,2\\}", True),  # escaped braces inside the box pair up too
    # \dfrac is \frac at display size, \frac12 is \frac{1}{2}: one number written three ways
    ("$\\boxed{\\dfrac{1}{2}}$", "\\frac12", True),
    # 0.5 is exactly 1/2 (MATH's own normalisation maps "0.5" to \frac{1}{2}); a reward that
    # rejected it would teach the model a notation, not mathematics
    ("$\\boxed{0.5}$", "\\frac12", True),
    # ...but only exactly: a rounded decimal is a different number
    ("$\\boxed{0.33}$", "\\frac13", False),
    # no \boxed: the instruction asks for one and a grader must not guess which number is meant
    ("The answer is 5.", "5", False),
    # cut off before the box closed: there is no final answer
    ("so $\\boxed{\\frac{1}{2}", "\\frac{1}{2}", False),
    # units after the number are not part of the answer (MATH's rule: what follows "\text{ ")
    ("The side is $\\boxed{5\\text{ cm}}$.", "5", True),
    ("$\\boxed{25\\text{cm}}$", "25", True),
    ("$\\boxed{30^\\circ}$", "30", True),
    ("$\\boxed{\\$18}$", "18", True),
    ("$\\boxed{10\\%}$", "10", True),
    # trailing text after the box does not matter; only the last box is the final answer
    ("$\\boxed{7}$. Checking: 3 + 4 = 7, as required.", "7", True),
    ("First $\\boxed{3}$, but that is wrong; correcting, $\\boxed{4}$ and done.", "3", False),
    ("First $\\boxed{3}$, but that is wrong; correcting, $\\boxed{4}$ and done.", "4", True),
    # "x = 2" answers with a name for the value; the value is what is graded
    ("$\\boxed{x = 2}$", "2", True),
    # one thousand with a separator, an integer written as a decimal, \left/\right sizing
    ("$\\boxed{1,000}$", "1000", True),
    ("$\\boxed{5.0}$", "5", True),
    ("$\\boxed{5.01}$", "5", False),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "(3,\\frac{\\pi}{2})", True),
    # an ordered pair keeps its order, and its comma is not a thousands separator
    ("$\\boxed{(2,1)}$", "(1,2)", False),
    # \text{} around a word is formatting; the word is the answer
    ("$\\boxed{\\text{Evelyn}}$", "\\text{Evelyn}", True),
    ("$\\boxed{\\text{Evelyn}}$", "Evelyn", True),
    # MATH's brace-less form for a one-token answer
    ("the answer is $\\boxed 5$.", "5", True),
    # a different expression is wrong however it is written
    ("$\\boxed{2\\sqrt{3}}$", "3\\sqrt{2}", False),
]


@pytest.mark.parametrize("output, answer, verdict", MATH_CASES)
def test_math_grader(output, answer, verdict):
    assert math_grader.math_reward(output, answer) == float(verdict)


def test_extract_boxed():
    assert extract_boxed("a $\\boxed{\\frac{a}{\\sqrt{b}}}$ b") == "\\frac{a}{\\sqrt{b}}"
    assert extract_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{open") is None

# ----------------------------------------------------------------------------- MATH-style outputs

# Gold answers in the styles MATH-500's take, written for this test (the dataset itself is not used)
WRITTEN = r"""
0|1|-1|7|12|36|42|84|100|-17|2016|1999|2220|1000|10000|123456|10,\!000|1,\!000,\!000|\$32,\!348
\frac{1}{2}|\frac{3}{4}|-\frac{5}{6}|\frac{14}{3}|\frac{17}{25}|\dfrac{7}{12}|\frac{1}{100}|\frac{2}{9}|\tfrac{9}{4}
0.5|3.75|-2.5|0.125|12.5|1.2|\$18.90|\$1.25
3\sqrt{13}|2\sqrt{3}|\sqrt{2}|\frac{\sqrt{3}}{2}|4\sqrt{2}|\frac{5\sqrt{2}}{2}|6+2\sqrt{5}|\sqrt[3]{2}|2\sqrt[3]{4}
\frac{1+\sqrt{5}}{2}|\sqrt{65}|-3+\sqrt{7}|\frac{\sqrt{6}}{3}|5\sqrt{3}-5|12\sqrt{2}|\sqrt{3}-1
4\pi|\frac{\pi}{3}|36\pi|\frac{9\pi}{2}|2\pi-4|100\pi|\frac{3\pi}{4}|8-2\pi|\frac{32\pi}{3}|16\pi+8
6-5i|3+4i|-2i|1+i|\frac{1}{2}-\frac{\sqrt{3}}{2}i|-7+24i|2+3i
(-\infty,3]|[2,5)|(-2,7)|(-\infty,-1)\cup(1,\infty)|[0,\frac{1}{2}]|(3,\infty)|[-1,1]|(-\infty,0)\cup(0,\infty)
(1,2)|(3,-4)|(\frac{1}{2},3)|(2,3,4)|(0,0)|(-1,5)|(6,\frac{\pi}{3})|(3,\frac{\pi}{2},2)|(-\frac{1}{3},\frac{22}{3})
\begin{pmatrix}1\\2\end{pmatrix}|\begin{pmatrix}2&0\\0&2\end{pmatrix}|\begin{pmatrix}-1\\3\\5\end{pmatrix}
\begin{pmatrix}\frac{1}{2}&0\\0&1\end{pmatrix}|\begin{pmatrix}4\\-3\end{pmatrix}|\begin{pmatrix}1&-2\\3&4\end{pmatrix}
x^2+2x+1|2x-3|-x^2+4x|3x^2-5x+2|\frac{x+1}{x-1}|y=2x+3|x^3-2x|4a^2|2a+3b|a^2-b^2|(x-1)(x+1)
2x-y+3z+8=0|x^2+y^2=25|\frac{1}{x}|p+q|8-3t|6x^2+11x-35|2^{10}|3^{20}
-2x+5|x^2-7x+12|\frac{3}{2}x-1|4-\sqrt{2}|2n+1|-\frac{1}{2}+\frac{\sqrt{3}}{2}i|2^{11}-1|1-\frac{\pi}{4}
\text{Monday}|\text{(C)}|\text{(A)}|\text{(E)}|\text{(B)}|\text{(D)}|\text{Devon}|\text{even}|\text{odd}|\text{neither}|\text{Evelyn}
30^\circ|90^\circ|120^\circ|75^\circ|45^\circ|25\%|12.5\%|40\%
52_8|1010_2|2112_3|123_4|1001_2|11100_2|403_5
1,-2|-3,3|2,5,8|1,2,3,4|\frac{1}{2},3|-1,\frac{3}{2}|\{1,2,3\}
5\text{ cm}|12\text{ inches}|20\text{ square units}|6\text{ feet}|150\text{ miles}|8\text{ days}|24\text{ apples}
"""


def gold_answers():
    """The written answers, and more integers, fractions, radicals and decimals drawn by a seeded rng."""
    golds = [g for line in WRITTEN.strip().splitlines() for g in line.split("|")]
    rng = random.Random(24)
    golds += [str(rng.choice([1, -1, 1, 1]) * rng.randint(2, 5000)) for _ in range(60)]
    for _ in range(40):
        f = Fraction(rng.randint(1, 99), rng.randint(2, 99))
        if f.denominator > 1:
            golds.append(f"{'-' if rng.random() < 0.2 else ''}\\frac{{{f.numerator}}}{{{f.denominator}}}")
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.choice([2, 3, 5, 6, 7, 10, 11, 13, 14, 15, 17, 19, 21])
        golds.append(f"{a}\\sqrt{{{b}}}")
    golds += [f"{rng.randint(0, 99)}.{rng.randint(1, 9)}{rng.randint(1, 9)}" for _ in range(20)]
    return list(dict.fromkeys(golds))


GOLDS = gold_answers()


def has_members(gold):
    """Whether gold answers with more than one item (a list, tuple, interval, set or matrix)."""
    return bool(re.search(r",|\\cup|\\begin", gold))


def off_by_one(gold):
    """gold with its last integer one larger: 7 -> 8, \\frac{3}{4} -> \\frac{3}{5}, (1,2) -> (1,3)."""
    digits = list(re.finditer(r"\d+", gold))
    if not digits:
        return None
    last = digits[-1]
    return gold[:last.start()] + str(int(last[0]) + 1) + gold[last.end():]


def reordered(gold):
    """gold's first term moved to the end: 6 - 5i -> - 5i + 6; None without two terms at top level."""
    if has_members(gold) or "=" in gold or "\\text" in gold:
        return None
    depth = 0
    for k, c in enumerate(gold):
        depth += (c in "{([") - (c in "})]")
        if depth == 0 and k > 0 and c in "+-" and gold[k - 1] not in "^_{(":
            head, tail = gold[:k], gold[k:]
            return tail.lstrip("+") + (f" - {head[1:]}" if head.startswith("-") else f" + {head}")
    return None


def with_cdot(gold):
    r"""3\sqrt{13} -> 3 \cdot \sqrt{13}, 4\pi -> 4 \cdot \pi, 2x -> 2 \cdot x."""
    if "\\text" in gold:
        return None
    new = re.sub(r"(\d)(\\sqrt|\\pi|[a-z](?![a-z]))", r"\1 \\cdot \2", gold, count=1)
    return new if new != gold else None


def thousands(gold):
    """2220 -> 2{,}220: LaTeX's thousands separator."""
    plain = gold.replace(",\\!", "")
    m = re.fullmatch(r"(\\\$)?(\d{4,})", plain)
    return m and (m[1] or "") + f"{int(m[2]):,}".replace(",", "{,}")


def base_braces(gold):
    """52_8 -> 52_{8}."""
    new = re.sub(r"_(\d+)", r"_{\1}", gold)
    return new if new != gold else None


def choice_letter(gold):
    r"""\text{(C)} -> C."""
    m = re.fullmatch(r"\\text\{\(([A-E])\)\}", gold)
    return m and m[1]


UNIT_FORMS = [" cm", "cm", "\\text{cm}", "\\text{ inches}", " \\text{square units}", "\\mbox{ feet}", "\\,\\text{m}",
              " degrees", "\\text{ dollars}"]


def with_units(gold, i):
    """A unit after a number, with or without a space or \\text (5\\text{ cm} -> 5cm, 7 -> 7 cm)."""
    m = re.fullmatch(r"(-?[\d.]+)\\text\{ ([a-z ]+)\}", gold)
    if m:
        return [m[1] + m[2], m[1] + " " + m[2], m[1] + "\\text{" + m[2] + "}"][i % 3]
    return gold + UNIT_FORMS[i % len(UNIT_FORMS)] if re.fullmatch(r"-?[\d.]+", gold) else None


def spaced(gold):
    r"""A space between every two tokens: \frac{1}{2} -> \frac { 1 } { 2 } (LaTeX reads both alike)."""
    tokens = re.findall(r"\\(?:text|begin|end)\{[^{}]*\}|\\[a-zA-Z]+|\\.|\d+(?:(?:,\\!|\{,\}|\.)\d+)*|\S", gold)
    new = " ".join(tokens)
    return new if new != gold else None


def negated(gold):
    """-gold, for an answer that is one nonzero value."""
    if has_members(gold) or "=" in gold or "\\text{" in gold and "\\text{ " not in gold or gold in ("0", "0.0"):
        return None
    if re.fullmatch(r"-?[^-+]*", gold):
        return gold[1:] if gold.startswith("-") else "-" + gold
    return f"-\\left({gold}\\right)"


HEDGE_FORMS = ["{} \\text{{ or }} {}", "{1} \\text{{ or }} {0}", "{}, {}", "{} \\text{{ and }} {}", "{} or {}",
               "{} \\quad\\text{{or}}\\quad {}"]


def hedge(gold, i):
    """The right answer beside a wrong one: \\frac{14}{3} \\text{ or } 15."""
    other = off_by_one(gold) or "\\text{none}"
    return HEDGE_FORMS[i % len(HEDGE_FORMS)].format(gold, other)


def box(answer):
    return None if answer is None else f"So the final answer is $\\boxed{{{answer}}}$."


# category -> (what it writes for gold number i: a model output, or None where it does not apply;
#              whether that output is right)
CATEGORIES = {
    "exact": (lambda g, i: box(g), True),
    "double braces {{9}}": (lambda g, i: box("{" + g + "}"), True),
    "terms reordered": (lambda g, i: box(reordered(g)), True),
    "3 \\cdot \\sqrt{13}": (lambda g, i: box(with_cdot(g)), True),
    "2{,}220": (lambda g, i: box(thousands(g)), True),
    "52_{8}": (lambda g, i: box(base_braces(g)), True),
    "C for \\text{(C)}": (lambda g, i: box(choice_letter(g)), True),
    "units": (lambda g, i: box(with_units(g, i)), True),
    "spaces": (lambda g, i: box(spaced(g)), True),
    "off by one": (lambda g, i: box(off_by_one(g)), False),
    "negated": (lambda g, i: box(negated(g)), False),
    "cut off": (lambda g, i: f"So the final answer is $\\boxed{{{g[:len(g) // 2 + 1]}", False),
    "wrong last box": (lambda g, i: off_by_one(g) and f"$\\boxed{{{g}}}$? No: $\\boxed{{{off_by_one(g)}}}$.", False),
    "hedge": (lambda g, i: box(hedge(g, i)), False),
}


def outputs(category):
    """[(output, gold)] of a category over GOLDS, where it applies."""
    write, _ = CATEGORIES[category]
    return [(out, g) for i, g in enumerate(GOLDS) if (out := write(g, i)) is not None]


def acceptance(grader, category, every=1):
    """(rate the grader accepts the category's outputs at, how many) over every `every`-th output."""
    pairs = outputs(category)[::every]
    return sum(grader(out, g) for out, g in pairs) / len(pairs), len(pairs)


def test_the_rewritings_are_what_they_claim():
    assert len(GOLDS) >= 300 and all(len(outputs(c)) >= 5 for c in CATEGORIES)
    assert (reordered("6-5i"), reordered("-3+\\sqrt{7}"), reordered("(1,2)")) == ("-5i + 6", "\\sqrt{7} - 3", None)
    assert (with_cdot("3\\sqrt{13}"), thousands("2220"), base_braces("52_8")) == ("3 \\cdot \\sqrt{13}", "2{,}220", "52_{8}")
    assert (choice_letter("\\text{(C)}"), with_units("5\\text{ cm}", 0), with_units("7", 0)) == ("C", "5cm", "7 cm")
    assert spaced("\\frac{1}{2}") == "\\frac { 1 } { 2 }"
    assert (off_by_one("\\frac{3}{4}"), negated("6-5i"), negated("-2")) == ("\\frac{3}{5}", "-\\left(6-5i\\right)", "2")
    assert hedge("\\frac{14}{3}", 0) == "\\frac{14}{3} \\text{ or } \\frac{14}{4}"


@pytest.mark.parametrize("category", CATEGORIES)
def test_acceptance_rates(category):
    rate, n = acceptance(math_reward, category)
    right = CATEGORIES[category][1]
    if category == "exact":
        assert rate == 1.0
    elif right:
        assert rate >= 0.97, (category, n)
    elif category == "hedge":
        assert rate <= 0.01, n
    else:
        assert rate == 0.0, n


def test_every_gold_matches_itself_as_grpo_checks():
    assert all(math_reward(f"\\boxed{{{g}}}", g) == 1.0 for g in GOLDS)


@functools.lru_cache(maxsize=None)
def math_verify_gold(gold):
    from math_verify import parse
    return parse(f"${gold}$")


def math_verify_reward(output, gold):
    """HF math-verify's verdict, with its own defaults (its timeouts included)."""
    from math_verify import parse, verify
    return float(verify(math_verify_gold(gold), parse(output)))


def test_math_verify_as_reference():
    """math-verify, an independent grader, on every 8th output of each category: where it accepts
    an equivalent rewriting this grader accepts it too (>= 97%), and where it refuses a wrong
    answer or a hedge this grader refuses it too."""
    pytest.importorskip("math_verify")
    for category, (_, right) in CATEGORIES.items():
        pairs = outputs(category)[::8]
        theirs = [math_verify_reward(out, g) for out, g in pairs]
        ours = [math_reward(out, g) for out, g in pairs]
        if right:
            assert sum(o for o, t in zip(ours, theirs) if t) >= 0.97 * sum(theirs), category
        else:
            assert not any(o and not t for o, t in zip(ours, theirs)), category

# ----------------------------------------------------------------------------- bounded time

PATHOLOGICAL = [
    "\\boxed{2^{2^{2^{2^{100}}}}}",                              # a power tower
    "\\boxed{9^{99999999}}",                                    # one huge power
    "\\boxed{(10^{9000})^{10^{9000}}}",
    "\\boxed{\\exp(\\exp(\\exp(\\exp(100))))}",
    "\\boxed{\\sin(10^{7000})}",                                # needs 7000 digits of pi
    "\\boxed{(x+1)^{10000}(y+2)^{10000}}",                     # would expand to 10^8 terms
    "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}",    # nested 400 deep
    "\\boxed{" + "(" * 450 + "1" + ")" * 450 + "}",
    "\\boxed{" + "(1," * 300 + "1" + ")" * 300 + "}",
    "\\boxed{" + "x+" * 499 + "1}",                              # 1000 characters
    "\\boxed{" + "1," * 499 + "}",                               # a list of 499
    "\\boxed{" + "1+" * 5000 + "1}",                              # 10,000 characters
    "\\boxed{5 " + "a " * 495 + "}",
    "\\boxed{9**9**9}",                                          # each of these three hangs DeepScaleR's
    "\\boxed{10000000!}",                                        # sympy check past 5 s
    "\\boxed{2**2**2**2**2**2}",
]


@pytest.mark.parametrize("output", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_verdicts_take_well_under_a_second(output):
    golds = ["0", "(1,2)", "x^2+1", "\\frac{1}{2}", "1, 2, 3", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"]
    for gold in golds:
        start = time.perf_counter()
        assert math_reward(output, gold) == 0.0
        assert time.perf_counter() - start < 0.5  # the bound is 1 s, on 2 cores


def test_a_verdict_needs_no_main_thread():
    """grpo may grade under torchrun in any thread: no signal.alarm, whose timer works only in the
    main thread, so the bound holds (and the verdict is right) in a worker thread too."""
    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.extend(
        math_reward(o, "6 - 5i") for o in ("\\boxed{-5i + 6}", PATHOLOGICAL[0])))
    start = time.perf_counter()
    worker.start()
    worker.join(timeout=5)
    assert verdicts == [1.0, 0.0] and time.perf_counter() - start < 1.0


def test_math_equal_takes_the_answers_themselves():
    assert math_equal("-5i+6", "6-5i") and not math_equal(None, "5") and not math_equal("5", "")

# ----------------------------------------------------------------------------- the table of docs/grader.md


def rates_table(graders):
    """The rates table of docs/grader.md: each category's acceptance rate for each grader, then the
    mean time of a verdict, as a ratio to this grader's measured in the same run."""
    rows = [f"| output for the gold answer | n | {' | '.join(graders)} |", "|---|---:|" + "---:|" * len(graders)]
    seconds = dict.fromkeys(graders, 0.0)
    for category, (_, right) in CATEGORIES.items():
        rates = []
        for name, grader in graders.items():
            start = time.perf_counter()
            rates.append(acceptance(grader, category)[0])
            seconds[name] += time.perf_counter() - start
        label = category if right else f"{category} (wrong)"
        rows.append(f"| {label} | {len(outputs(category))} | " + " | ".join(f"{r:.0%}" for r in rates) + " |")
    ours = seconds["this grader"]
    rows.append("| time per verdict, relative | | " + " | ".join(f"{t / ours:.0f}x" for t in seconds.values()) + " |")
    return rows


def test_the_table_here_is_what_the_tests_measure():
    """docs/grader.md's rates table: its categories, counts and this grader's rates are this run's."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "grader.md").read_text()
    first_cells = lambda row: [cell.strip() for cell in row.strip().strip("|").split("|")][:3]
    rows = rates_table({"this grader": math_reward})
    measured = [first_cells(row) for row in rows[:1] + rows[2:-1]]  # the header, the categories
    documented = [first_cells(row) for row in doc.splitlines() if first_cells(row) in measured]
    assert documented == measured
    assert f"({len(GOLDS)} gold answers" in doc and f"{sum(len(outputs(c)) for c in CATEGORIES)} outputs)" in doc


# DeepScaleR's reward grader, measured beside ours from a copy of rllm that the reader fetches:
# the project ships none of its code. Its file, at either of rllm's layouts:
DEEPSCALER_FILES = ("rllm/rewards/math_utils/utils.py", "deepscaler/rewards/math_utils/utils.py")
DEEPSCALER_SECONDS = 5.0  # per verdict (math-verify's default): DeepScaleR's sympy.simplify has no bound


def load_deepscaler(directory):
    """DeepScaleR's verdict function, from rllm's math_utils file under directory. Loaded by path,
    not as a package: rllm's own __init__ imports its whole training stack."""
    path = next((Path(directory) / f for f in DEEPSCALER_FILES if (Path(directory) / f).is_file()), None)
    if path is None:
        sys.exit(f"--deepscaler: {directory} has no {' or '.join(DEEPSCALER_FILES)} (a copy of rllm's)")
    spec = importlib.util.spec_from_file_location("deepscaler_math_utils", path)
    utils = importlib.util.module_from_spec(spec)
    try:
        with warnings.catch_warnings():  # its regexes are written with invalid escapes ("\^")
            warnings.simplefilter("ignore", SyntaxWarning)
            spec.loader.exec_module(utils)
    except ImportError as e:
        sys.exit(f"--deepscaler: {path} needs {e.name} (pip install {e.name})")

    def deepscaler_reward(output, gold):
        # RewardMathFn after the thinking part (these outputs have none): the last \boxed, then
        # Hendrycks' normalisation or PRM800K's sympy check against the gold as given
        answer = utils.extract_answer(output)
        return answer is not None and (utils.grade_answer_mathd(answer, gold) or utils.grade_answer_sympy(answer, gold))
    return deepscaler_reward


class VerdictTimeout(BaseException):
    """The timer's exception: a BaseException, so sympy's `except Exception` cannot swallow it."""


def bounded(grade, seconds, record):
    """grade(output, gold), cut off by SIGALRM after `seconds` (so in the main thread only); a verdict
    cut off is a refusal. record gets (seconds taken, timed out, output, gold) for each verdict.
    rllm's bare `except:` may swallow the exception: the timer re-fires every 50 ms, and a verdict
    it fired on is a refusal whatever it returned."""
    def verdict(output, gold):
        fired = []

        def on_alarm(signum, frame):
            fired.append(True)
            raise VerdictTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        start = time.perf_counter()
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
                accepted = bool(grade(output, gold))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except VerdictTimeout:
            accepted = False
        finally:
            signal.signal(signal.SIGALRM, previous)
        record.append((time.perf_counter() - start, bool(fired), output, gold))
        return float(accepted and not fired)
    return verdict


def parse_args(argv):
    """(--math_verify given, the directory after --deepscaler or None), flags in any order."""
    usage = f"usage: python tests/test_math_grader.py [--math_verify] [--deepscaler DIR] (got {' '.join(argv)})"
    math_verify, deepscaler, rest = False, None, list(argv)
    while rest:
        flag = rest.pop(0)
        if flag == "--math_verify" and not math_verify:
            math_verify = True
        elif flag == "--deepscaler" and deepscaler is None and rest:
            deepscaler = rest.pop(0)
        else:
            sys.exit(usage)
    return math_verify, deepscaler


def main(argv):
    with_math_verify, deepscaler_dir = parse_args(argv)
    graders = {"this grader": math_reward}
    if with_math_verify:
        try:
            import math_verify  # noqa: F401
        except ImportError:
            sys.exit("--math_verify: math-verify is not installed (pip install -r requirements-test.txt)")
        graders["math-verify"] = math_verify_reward
    record = []
    if deepscaler_dir is not None:
        graders["DeepScaleR"] = bounded(load_deepscaler(deepscaler_dir), DEEPSCALER_SECONDS, record)
    print(f"{len(GOLDS)} gold answers, {sum(len(outputs(c)) for c in CATEGORIES)} outputs")
    print("\n".join(rates_table(graders)))
    if record:
        print(f"\nDeepScaleR: {sum(r[1] for r in record)} of {len(record)} verdicts timed out "
              f"(over {DEEPSCALER_SECONDS:g} s, counted as refused); the slowest:")
        for seconds, timed_out, output, gold in sorted(record, key=lambda r: r[0], reverse=True)[:5]:
            print(f"  {seconds:.2f} s{' (timed out)' if timed_out else ''}: {output!r} for gold {gold!r}")


def test_a_verdict_past_the_timer_is_a_refusal():
    """The timer the table puts on DeepScaleR's verdicts: a verdict past it is a refusal, also when
    the grader swallows the timer's exception as rllm's bare `except:` does; a quick verdict is the
    grader's own, and no timer is left running."""
    def swallows_the_timer(output, gold):
        try:
            while True:
                pass
        except:  # noqa: E722 (as rllm's sympy check)
            return True
    record = []
    assert bounded(swallows_the_timer, 0.1, record)("5", "5") == 0.0
    assert bounded(lambda output, gold: output == gold, 0.1, record)("5", "5") == 1.0
    assert [timed_out for _, timed_out, *_ in record] == [True, False] and record[0][0] < 1.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("argv, message", [(["--deepscaler"], "usage: "), (["--math_verify", "-x"], "usage: "),
                                           (["--deepscaler", "."], "--deepscaler: . has no rllm/")])
def test_the_table_command_says_what_is_wrong_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=message) as error:
        main(argv)
    assert "\n" not in str(error.value)


if __name__ == "__main__":
    main(sys.argv[1:])
