r"""
The MATH grader: is the final \boxed{} answer of a model's text equal to the gold answer?
eval.py's MATH-500 verdict and grpo.py's reward are this one function (math_reward), so the RL
stage and its benchmark cannot disagree. It accepts what DeepScaleR's reward grader accepts (rllm's
math_utils: MATH's string normalisation, else PRM800K's sympy check) and refuses hedges; the
values are compared by a small LaTeX reader of its own, in bounded time (docs/grader.md says why,
and how it differs from DeepScaleR's grader and from math-verify).

The rules, in the order they apply (tests/test_math_grader.py holds a case for each):
 1. The answer is the content of the last \boxed{...} or \fbox{...}, braces matched (MATH's
    "\boxed 5" too). No box, or a box never closed (the output was cut off): wrong.
 2. Several answers are a list: "a, b", "a; b", "a \text{ or } b", "a and b". A list equals a gold
    list with the same members in any order, and never a single gold answer: a hedge is wrong.
 3. Notation goes: $, \left \right, \! \, \; \quad ~, spaces (not the one that ends a command:
    \pi r), \dfrac \tfrac (\frac), braces around the whole answer ({{9}}), \text{} \mbox{} \mathrm{}
    around words, thousands separators (1,000  1{,}000  1,\!000), a trailing .0 or full stop,
    degrees, \%.
 4. Units after the answer go (5\text{ cm}, 5 cm, 5cm, 6\text{ cm}^2): a known unit word, or a word
    the gold answer itself writes as MATH writes units (\text{ apples}). Other words stay, so
    "\frac{14}{3} \text{ or } 15" is a list (rule 2), not \frac{14}{3} and a unit.
 5. LaTeX shorthand is spelled out: \frac12 = \frac{1}{2}, \sqrt3 = \sqrt{3}, 3/4 = \frac{3}{4},
    52_{8} = 52_8, .5 = 0.5; a choice (C) = \text{(C)} = C; a word is compared without case.
 6. "x = 5" is 5 when a name stands before the one "=" (one or two letters or \theta, with a
    subscript or an argument: AB =, x_1 =, f(x) =, x \in); "10 = 5" stays an equation, which equals
    only an equation with the same sides (either way round).
 7. Brackets keep their meaning: (1,2) is neither [1,2], 1,2 nor (2,1); \{1,2\} is a set (any
    order), and equals the bare list of its members (\{1,2,3\} for "1, 2, 3", all the solutions);
    unions of intervals match in any order; matrices (any of pmatrix bmatrix ...) cell by
    cell; 52_8 is a numeral in base 8, equal to no decimal number.
 8. Two answers that are the same string are equal; otherwise their values are compared: exactly
    while both are rational (0.5 = \frac12 = \frac{2}{4}, 2\frac{1}{2} = \frac52, 0.33 != \frac13,
    10^{30}+1 != 10^{30}), else at 60 digits, to 1e-40 relative, with each variable set to two
    values in turn (6 - 5i = -5i + 6, 3 \cdot \sqrt{13} = 3\sqrt{13}, (x+1)^2 = x^2+2x+1).
    A decimal rounded from an irrational value is wrong (1.414 != \sqrt2).
 9. Bounded work, with no timer (signal.alarm works only in a process's main thread): an answer
    over MAX_CHARS characters is wrong unread; one over MAX_TOKENS tokens, nested over MAX_DEPTH,
    or with a value past 2^MAX_BITS is compared as a string only. One verdict takes milliseconds,
    whatever the output.
"""
import random
import re
from fractions import Fraction

import mpmath

MAX_CHARS = 1000    # MATH's longest gold answers are ~200 characters
MAX_TOKENS = 300    # LaTeX tokens of one answer read as a value
MAX_DEPTH = 20      # brackets, fractions, powers and tuples nested deeper are not read
MAX_BITS = 30_000   # values past 2^30000 (~10^9000) are not computed: 2^{2^{100}} would never finish
# the floating-point comparison: a context of its own at 60 digits, never changed, so grading in
# threads (or beside other mpmath users) cannot change its precision
MP = mpmath.MPContext()
MP.dps = 60
TOLERANCE = MP.mpf(10) ** -40


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

# ----------------------------------------------------------------------------- notation

LIST_SEPARATOR = re.compile(r"(?<!\\)[,;]|\s*(?:\\q?quad)?\s*(?:\\(?:text|textrm|textbf|mbox|mathrm)\s*"
                            r"\{\s*(?:or|and)\s*\}|(?<![A-Za-z\\])(?:or|and)(?![A-Za-z]))\s*(?:\\q?quad)?\s*")
UNIT_WORDS = set("""unit degree radian cm centimeter centimetre mm millimeter km kilometer meter metre inch foot
    feet ft yard yd mile mph second sec minute min hour hr day week month year dollar cent gram kg kilogram
    pound lb ounce oz liter litre ml gallon quart pint cup square sq cubic per""".split())
SHORT_UNITS = {"m", "s", "g", "h", "l"}  # single letters are units only inside \text{}
TEXT_UNIT = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*\{([^{}]*)\}\s*(?:\^\{?[23]\}?)?\s*$")
BARE_UNIT = re.compile(r"(?<=[\d})\s])([a-zA-Z][a-zA-Z ./]*?)\s*(?:\^\{?[23]\}?)?\s*$")
NAME = re.compile(r"\s*(?:[a-zA-Z]{1,2}|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-z]\))?\s*(?:=|\\in(?![a-zA-Z]))")


def split_top(s, separator):
    """s cut at each match of the separator outside brackets and braces: "(1,2), 3" -> ["(1,2)", " 3"]."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        m = separator.match(s, i) if depth == 0 else None
        if m and m.end() > i:
            parts.append(s[start:i])
            start = i = m.end()
            continue
        depth += (s[i] in "([{") - (s[i] in ")]}")
        i += 1
    return parts + [s[start:]]


def closes_at_end(s):
    """Whether the bracket or brace that opens s is the one that closes it: "{9}" yes, "{1}{2}" no."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def unwrap_braces(s):
    r"""{{9}} -> 9, \boxed{9} -> 9: braces or a box around the whole answer are not part of it."""
    while True:
        s = s.strip()
        if s.startswith("\\boxed{"):
            s = s[len("\\boxed"):]
        if not (s.startswith("{") and closes_at_end(s)):
            return s
        s = s[1:-1]


def answer_items(answer):
    """The answer as a list of items (rule 2), after the notation that could hide a list is gone."""
    s = answer.replace("\n", " ").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)\.", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<=\d)(?:\{,\}|,\\!)(?=\d{3}(?!\d))", "", s)  # LaTeX's thousands separators: never a list
    s = unwrap_braces(s)
    m = re.match(r"-?\d{1,3}(?:,\d{3})+(?![\d,])", s)  # 1,000 at the start: a number, not a list
    if m:
        s = m[0].replace(",", "") + s[m.end():]
    return [item for item in split_top(s, LIST_SEPARATOR) if item.strip()]


def is_unit(word, units):
    word = word.lower()
    return any(w in UNIT_WORDS or w in units for w in (word, word[:-1] if word.endswith("s") else word,
                                                       word[:-2] if word.endswith("es") else word))


def strip_units(s, units):
    """s without the units after it (rule 4); units: words the gold answer uses as units."""
    for pattern in (TEXT_UNIT, BARE_UNIT):
        m = pattern.search(s)
        if not m or not s[:m.start()].strip():
            continue
        words = re.findall(r"[a-zA-Z]+", m[1])
        short_ok = pattern is TEXT_UNIT and len(words) == 1
        if words and all(is_unit(w, units) or short_ok and w in SHORT_UNITS for w in words):
            return s[:m.start()]
    return s


def gold_units(gold):
    r"""The words a gold answer writes as MATH writes its units, after the number: 5\text{ apples}."""
    words = re.findall(r"\\(?:text|mbox)\{ ([a-zA-Z ]+)\}", gold)
    return {w.lower() for phrase in words for w in phrase.split() if w not in ("or", "and")}


def normalize_answer(s, units=()):
    """One answer item in a canonical string form (rules 3 to 6): two ways of writing the same
    answer that the rules accept give the same string."""
    s = re.sub(r"(?<!\\)\\(?:[!,;: ]|q?quad(?![a-zA-Z]))|~|\\displaystyle", " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = strip_units(s, units)
    s = re.sub(r"\\(?:text|textbf|textrm|textit|textnormal|mbox|mathrm|mathbf|mathit|operatorname)\s*"
               r"\{([^{}]*)\}", r"\1", s)
    if len(re.findall(r"=|\\in(?![a-zA-Z])", s)) == 1 and NAME.match(s):
        s = s[NAME.match(s).end():]
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+", lambda m: m[1] + " " if m[1] else "", s)
    s = unwrap_braces(s).lstrip("+")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    brace = lambda arg: arg if arg.startswith("{") else "{" + arg + "}"
    s = re.sub(r"\\frac(\{[^{}]*\}|\w)(\{[^{}]*\}|\w)", lambda m: "\\frac" + brace(m[1]) + brace(m[2]), s)
    s = re.sub(r"(\d)_\{(\d+)\}", r"\1_\2", s)  # a base: 52_{8}
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)
    s = re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", s)
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    s = re.sub(r"(\d)\.0*(?![\d])", r"\1", s)  # 5.0 and a full stop: 5.
    s = s.replace("\\varnothing", "\\emptyset")
    return re.sub(r"^\(([A-Z])\)$", r"\1", s)  # a choice: (C)

# ----------------------------------------------------------------------------- values

TOKEN = re.compile(r"\\[a-zA-Z]+|\\[{}]|\d+(?:\.\d+)?|\.\d+|\S")
FUNCTIONS = {"\\sin": MP.sin, "\\cos": MP.cos, "\\tan": MP.tan, "\\cot": MP.cot, "\\sec": MP.sec, "\\csc": MP.csc,
             "\\arcsin": MP.asin, "\\arccos": MP.acos, "\\arctan": MP.atan, "\\ln": MP.ln, "\\log": MP.ln,
             "\\exp": MP.exp}
CONSTANTS = {"\\pi": MP.pi, "\\infty": MP.inf, "i": MP.mpc(0, 1)}
GREEK = set("""alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta kappa lambda mu nu xi rho
    sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega""".split())
CLOSING = {"(": ")", "[": "]", "{": "}"}


class Inexact(Exception):
    """A value that is not a rational number (an irrational, complex or symbolic one)."""


class TooBig(Exception):
    """A value past 2^MAX_BITS: not worth computing."""


class LatexReader:
    """Reads one LaTeX expression into a tree of tuples: ("num", Fraction), ("var", name),
    ("const", name), ("neg", a), (op, a, b) for + - * / ^, ("root", a, n), ("call", name, a).
    Raises ValueError on anything else, or past MAX_DEPTH."""

    def __init__(self, s):
        self.tokens, self.pos = TOKEN.findall(s), 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected=None):
        tok = self.peek()
        if tok is None or expected is not None and tok != expected:
            raise ValueError(f"expected {expected}, got {tok}")
        self.pos += 1
        return tok

    def starts_atom(self, tok):
        return tok is not None and (tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in "({"
                                    or tok in ("\\frac", "\\sqrt") or tok in FUNCTIONS or tok in CONSTANTS
                                    or tok[1:] in GREEK)

    def sum(self, depth):
        tree = self.product(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            tree = (op, tree, self.product(depth))
        return tree

    def product(self, depth):
        tree = self.signed(depth)
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times", "/", "\\div"):
                self.take()
                tree = ("/" if tok in ("/", "\\div") else "*", tree, self.signed(depth))
            elif self.starts_atom(tok):  # 2x, 3\sqrt{13}, (x+1)(x-1)
                tree = ("*", tree, self.power(depth))
            else:
                return tree

    def signed(self, depth):
        negative = False
        while self.peek() in ("+", "-"):
            negative ^= self.take() == "-"
        tree = self.power(depth)
        return ("neg", tree) if negative else tree

    def power(self, depth):
        base = self.atom(depth)
        if self.peek() != "^":
            return base
        self.take()
        return ("^", base, self.argument(depth + 1))

    def argument(self, depth):
        r"""A command's argument: a {group}, else one token, of a number one digit (\frac12, x^23)."""
        tok = self.peek()
        if tok == "{":
            self.take()
            tree = self.sum(depth + 1)
            self.take("}")
            return tree
        if tok is not None and tok.isdigit() and len(tok) > 1:
            self.tokens[self.pos] = tok[1:]
            return ("num", Fraction(tok[0]))
        return self.atom(depth + 1)

    def atom(self, depth):
        if depth > MAX_DEPTH:  # every nesting passes here: (, \frac, \sqrt, ^, _, \sin
            raise ValueError("nested too deep")
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            whole = ("num", Fraction(tok))
            if tok.isdigit() and self.peek() == "\\frac" and re.fullmatch(r"\\frac \{ \d+ \} \{ \d+ \}",
                                                                         " ".join(self.tokens[self.pos:self.pos + 7])):
                return ("+", whole, self.atom(depth))  # a mixed number: 2\frac{1}{2} is 5/2
            return whole
        if tok in CLOSING:
            tree = self.sum(depth + 1)
            self.take(CLOSING[tok])
            return tree
        if tok == "\\frac":
            return ("/", self.argument(depth + 1), self.argument(depth + 1))
        if tok == "\\sqrt":
            index = ("num", Fraction(2))
            if self.peek() == "[":
                self.take()
                index = self.sum(depth + 1)
                self.take("]")
            return ("root", self.argument(depth + 1), index)
        if tok in FUNCTIONS:
            base = None
            if tok == "\\log" and self.peek() == "_":
                self.take()
                base = self.argument(depth + 1)
            call = ("call", tok, self.power(depth + 1))
            return call if base is None else ("/", call, ("call", "\\ln", base))
        if tok in CONSTANTS:
            return ("const", tok)
        if tok.isalpha() or tok[1:] in GREEK:
            if self.peek() != "_":
                return ("var", tok)
            self.take()
            start = self.pos
            self.argument(depth + 1)  # read only to find where the subscript ends: x_1, a_{n+1}
            return ("var", tok + "_" + "".join(self.tokens[start:self.pos]))
        raise ValueError(f"cannot read {tok}")


def read_value(s):
    """s as an expression tree, or None where it is not one (a word, a base-8 numeral, ...)."""
    if re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", s):
        return None  # a run of 3+ letters is a word, not a product of variables
    reader = LatexReader(s)
    if len(reader.tokens) > MAX_TOKENS:
        return None
    try:
        tree = reader.sum(0)
    except (ValueError, IndexError, ZeroDivisionError):
        return None
    return tree if reader.pos == len(reader.tokens) else None


def power(base, exponent, exact):
    if exact:
        if exponent.denominator != 1:
            raise Inexact
        if max(base.numerator.bit_length(), base.denominator.bit_length(), 1) * abs(exponent) > MAX_BITS:
            raise TooBig
        return base ** int(exponent)
    if base != 0 and abs(exponent) * max(1, abs(MP.mag(base))) > MAX_BITS:
        raise TooBig
    return base ** exponent


def root(x, n, exact):
    r"""The n-th root: exact for perfect powers (\sqrt{\frac94} = \frac32); the real root of a
    negative number for odd n (\sqrt[3]{-8} = -2), as LaTeX means it."""
    if not exact:
        if n != int(n) or abs(n) > MAX_BITS:
            return power(x, 1 / n, False)
        odd_negative = MP.im(x) == 0 and MP.re(x) < 0 and int(n) % 2 == 1
        return -MP.root(-x, int(n)) if odd_negative else MP.root(x, int(n))
    if n.denominator != 1 or not 2 <= n <= 64 or x < 0 and n % 2 == 0 or abs(x) > 2 ** 1000:
        raise Inexact
    parts = []
    for v in (abs(x).numerator, abs(x).denominator):
        r = round(v ** (1 / int(n)))
        r = next((c for c in (r - 1, r, r + 1) if c >= 0 and c ** int(n) == v), None)
        if r is None:
            raise Inexact
        parts.append(r)
    return (-1 if x < 0 else 1) * Fraction(*parts)


def evaluate(tree, env):
    """tree's value: exact (a Fraction) when env is None, else an mpmath number with env's values
    for the variables. Raises Inexact (exact only), TooBig, ZeroDivisionError."""
    kind = tree[0]
    if kind == "num":
        return tree[1] if env is None else MP.mpf(tree[1].numerator) / tree[1].denominator
    if env is None and kind in ("var", "const", "call"):
        raise Inexact
    if kind == "var":
        return env[tree[1]]
    if kind == "const":
        return CONSTANTS[tree[1]]
    if kind == "call":
        argument = evaluate(tree[2], env)
        if abs(argument) > MAX_BITS:  # exp(10^{100}) overflows, sin(10^{7000}) needs 7000 digits
            raise TooBig
        return FUNCTIONS[tree[1]](argument)
    if kind == "neg":
        return -evaluate(tree[1], env)
    a, b = evaluate(tree[1], env), evaluate(tree[2], env)
    if kind == "root":
        return root(a, b, env is None)
    if kind == "^":
        return power(a, b, env is None)
    return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[kind]()


def variables(tree):
    if tree[0] == "var":
        return {tree[1]}
    return set().union(*(variables(t) for t in tree[1:] if isinstance(t, tuple)))


def close(x, y):
    if not (MP.isfinite(x) and MP.isfinite(y)):
        return x == y  # \infty = \infty; nan equals nothing
    return abs(x - y) <= TOLERANCE * max(1, abs(x), abs(y))


def same_value(a, b):
    """Whether two expression trees have the same value (rule 8)."""
    try:
        return evaluate(a, None) == evaluate(b, None)
    except Inexact:
        pass
    except (TooBig, ZeroDivisionError):
        return False
    names = sorted(variables(a) | variables(b))
    for trial in range(2 if names else 1):
        # values in [0.5, 1.5), the same for a name on both sides, far from any pole a gold
        # answer has at a round number
        env = {name: MP.mpf(random.Random(f"{name} {trial}").random()) + 0.5 for name in names}
        try:
            if not close(evaluate(a, env), evaluate(b, env)):
                return False
        except (TooBig, ZeroDivisionError, ValueError, OverflowError, TypeError):
            return False
    return True

# ----------------------------------------------------------------------------- verdict

MATRIX = re.compile(r"\\begin\{([a-zA-Z]*matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}")
COMMA, ROW, CELL = re.compile(","), re.compile(r"\\\\"), re.compile("&")
UNION, EQUALS = re.compile(r"\\cup(?![a-zA-Z])"), re.compile("=")
WORD = re.compile(r"[a-zA-Z]{2,}")


def members(s):
    r"""(kind, members, ordered) when s is a matrix, a set, or a tuple or interval of two or more
    members (rule 7), else None. An interval's kind is its pair of brackets: (1,2] is not (1,2)."""
    m = MATRIX.fullmatch(s)
    if m:
        rows = [split_top(row, CELL) for row in split_top(m[2], ROW) if row]
        return ("matrix", [len(row) for row in rows]), [cell for row in rows for cell in row], True
    if s.startswith("\\{") and s.endswith("\\}") and closes_at_end(s[1:]):
        return "set", split_top(s[2:-2], COMMA), False
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and closes_at_end(s):
        inside = split_top(s[1:-1], COMMA)
        if len(inside) > 1:
            return s[0] + s[-1], inside, True
    return None


def same_members(ps, gs, ordered, depth):
    if len(ps) != len(gs):
        return False
    if ordered:
        return all(item_equal(p, g, depth + 1) for p, g in zip(ps, gs))
    left = list(ps)
    for g in gs:  # each gold member matched by a different predicted one
        match = next((i for i, p in enumerate(left) if item_equal(p, g, depth + 1)), None)
        if match is None:
            return False
        del left[match]
    return True


def item_equal(p, g, depth=0):
    """Whether two normalised answer items are equal (rules 5 to 8)."""
    if p == g:
        return True
    if depth > MAX_DEPTH:
        return False
    if WORD.fullmatch(p) or WORD.fullmatch(g):
        return p.lower() == g.lower()
    p_union, g_union = split_top(p, UNION), split_top(g, UNION)
    if len(p_union) > 1 or len(g_union) > 1:
        return same_members(p_union, g_union, False, depth)
    p_members, g_members = members(p), members(g)
    if p_members or g_members:
        return bool(p_members and g_members and p_members[0] == g_members[0]
                    and same_members(p_members[1], g_members[1], g_members[2], depth))
    p_sides, g_sides = split_top(p, EQUALS), split_top(g, EQUALS)
    if len(p_sides) > 1 or len(g_sides) > 1:
        if len(p_sides) != 2 or len(g_sides) != 2:
            return False
        (pl, pr), (gl, gr) = [[read_value(side) for side in sides] for sides in (p_sides, g_sides)]
        if None in (pl, pr, gl, gr):
            return False
        return same_value(("-", pl, pr), ("-", gl, gr)) or same_value(("-", pl, pr), ("-", gr, gl))
    p_tree, g_tree = read_value(p), read_value(g)
    return p_tree is not None and g_tree is not None and same_value(p_tree, g_tree)


def math_equal(pred, gold):
    """Whether a predicted answer (None: there was none) equals the gold one: the rules of the
    module docstring, in order."""
    if pred is None or len(pred) > MAX_CHARS:
        return False
    units = gold_units(gold)
    ps = [normalize_answer(item, units) for item in answer_items(pred)]
    gs = [normalize_answer(item, units) for item in answer_items(gold)]
    if len(ps) == 1 and len(gs) > 1 and (members(ps[0]) or ("",))[0] == "set":  # rule 7: a set of solutions
        ps = members(ps[0])[1]
    elif len(gs) == 1 and len(ps) > 1 and (members(gs[0]) or ("",))[0] == "set":
        gs = members(gs[0])[1]
    return bool(gs) and same_members(ps, gs, ordered=False, depth=-1)


def math_reward(completion_text, answer):
    """1.0 if the completion's last \\boxed{} answer equals `answer`, else 0.0: MATH-500's
    verdict, and grpo.py's reward, so the RL stage and its benchmark cannot disagree."""
    return float(math_equal(extract_boxed(completion_text), answer))


def grade_math(problem, text):
    boxed = extract_boxed(text)
    return {"boxed": boxed}, {"pass@1": float(math_equal(boxed, problem.answer))}
