# Answer extraction and grading (stdlib only, linear-time regexes, never raises on str input).
import re
import unicodedata
from fractions import Fraction

_BOX = re.compile(r"\\(?:boxed|fbox)")
_TOKEN = re.compile(r"[^\s$]*")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")  # a full stop, not a decimal point
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is", re.IGNORECASE)
# Thousands groups are comma-led, so the repetition cannot overlap itself (no backtracking blow-up).
_LAST_NUM = re.compile(r"(?:(?<![\w)])[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN = re.compile(_NUM)
_FRAC = re.compile(rf"(-?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")  # 1\frac{4}{5} is a mixed number, 9/5
_MAX_NUM_CHARS = 200  # Fraction of a 100k-digit string is slow; longer answers compare as strings only
_SUBS = [  # (pattern, replacement), applied in order before unit and prefix handling
    (re.compile(r"\\!\s*|(?<!\\)\\[,;: ]|\\displaystyle"), ""),  # `\!` glues `11,\! 111`; `\\ ` is a row break
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree|°"), ""),
    (re.compile(r"\\?[$%]"), ""),  # dollars and percent signs (50\% == 50, no /100 leniency)
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"[\u2212\u2013]"), "-"),
    (re.compile(r"\u2044"), "/"),
]
# A trailing unit: `10 \text{ cm}`, `15\mbox{ cm}^2`. Letters only, so `5 \text{ or 6}` keeps its text.
_UNIT = re.compile(r"\\(?:text|mbox|mathrm|textrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\s*\^\s*\{?[23]\}?)?$")
_WRAP = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")
_PREFIX = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)\s*(?:=|\\in(?![a-zA-Z]))")  # `x =`, `\theta=`, `x \in`
_SPACE = re.compile(r"\s+")
_FIXES = [  # applied after spaces are gone
    (re.compile(r"\\frac([0-9a-zA-Z])([0-9a-zA-Z])"), r"\\frac{\1}{\2}"),  # \frac12, \frac 34
    (re.compile(r"\\frac([0-9a-zA-Z])\{"), r"\\frac{\1}{"),  # \frac9{19}
    (re.compile(r"\\frac(\{[^{}]*\})([0-9a-zA-Z])"), r"\\frac\1{\2}"),  # \frac{270}7
    (re.compile(r"\\sqrt([0-9a-zA-Z])"), r"\\sqrt{\1}"),
    (re.compile(r"([_^])\{([0-9a-zA-Z]+)\}"), r"\1\2"),  # 4210_{5} -> 4210_5, x^{2} -> x^2
    (re.compile(r"(?<![\d.])\.(?=\d)"), "0."),
    (re.compile(r"^\+|^\(([A-Za-z])\)$"), r"\1"),  # +5 -> 5, (B) -> B
]
_MATRIX = re.compile(r"\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}")


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    close: dict[int, int] = {}  # one linear pass matches every brace, however many boxes there are
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close[stack.pop()] = i
    for start in reversed(starts):
        j = start
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            content = text[j + 1 : close[j]].strip() if j in close else ""
        elif j > start:  # `\boxed 5`: the next token
            content = _TOKEN.match(text, j).group().rstrip(".")
        else:  # `\boxedx` or `\fboxsep`: not a box
            content = ""
        if content and not _BOX.match(content):  # `\boxed \boxed` is no answer
            return content
    return None


def _tail(s: str) -> str:
    """The expression after a marker: up to the end of its line and sentence, without decorations."""
    s = s.split("\n", 1)[0]
    end = _SENTENCE_END.search(s)
    return (s[: end.start()] if end else s).lstrip(" \t:*").rstrip(" \t*.")  # keep `.5` whole


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    found = None
    for found in pattern.finditer(text):  # finditer is linear; keeping only the last match is O(1) memory
        pass
    return found


def extract_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = text.rfind("####")
    if hashes >= 0 and (ans := _tail(text[hashes + 4 :])):
        return ans
    if (said := _last(_ANSWER_IS, text)) and (ans := _tail(text[said.end() :])):
        return ans
    return number.group() if (number := _last(_LAST_NUM, text)) else None


def _normalize(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip()
    for pattern, repl in _SUBS:
        s = pattern.sub(repl, s)
    s = s.strip().rstrip(". ")
    unit = _UNIT.search(s)
    if unit and s[: unit.start()].strip():
        s = s[: unit.start()].strip()
    s = _WRAP.sub(r"\1", s).strip()
    if s.count("=") <= 1 and (prefix := _PREFIX.match(s)):
        s = s[prefix.end() :].strip()
    if _THOUSANDS.fullmatch(s):  # only a whole answer: `(1,234)` stays a pair, `1,234` is a number
        s = s.replace(",", "")
    s = _SPACE.sub("", s)
    for pattern, repl in _FIXES:
        s = pattern.sub(repl, s)
    return s


def _to_number(s: str) -> Fraction | None:
    if len(s) > _MAX_NUM_CHARS:
        return None
    try:
        if _PLAIN.fullmatch(s):
            return Fraction(s)
        if m := _FRAC.fullmatch(s) or _SLASH.fullmatch(s):
            groups = m.groups()
            value = Fraction(groups[-2]) / Fraction(groups[-1])
            return -value if groups[0] == "-" else value
        if m := _MIXED.fullmatch(s):
            value = int(m[2]) + Fraction(int(m[3]), int(m[4]))
            return -value if m[1] else value
    except (ValueError, ZeroDivisionError, OverflowError):
        pass
    return None


def _num_equal(a: Fraction, b: Fraction) -> bool:
    if a.denominator == 1 or b.denominator == 1:  # integers are exact: 1234567 != 1234568
        return a == b
    return abs(a - b) <= abs(b) * Fraction(1, 10**6)


def _split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` outside any (), [], {} nesting (interval ends may be mixed, like `(3,4]`)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        depth += (s[i] in "([{") - (s[i] in ")]}")
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _bracketed(s: str) -> tuple[str, str, str] | None:
    """(open, close, inner) when the whole of `s` is one bracketed group, else None."""
    op = "\\{" if s.startswith("\\{") else s[:1]
    cl = "\\}" if s.endswith("\\}") else s[-1:]
    if op not in ("(", "[", "\\{") or cl not in (")", "]", "\\}") or len(s) < len(op) + len(cl):
        return None
    inner = s[len(op) : len(s) - len(cl)]
    depth = 0
    for ch in inner:  # the opening bracket must not close before the end: `(a+5)(b+2)` is no tuple
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return None
    return op, cl, inner


def _equal_lists(a: list[str], b: list[str], ordered: bool, depth: int) -> bool:
    if len(a) != len(b) or len(a) > 1000:  # a cap on work, far above any real answer
        return False
    if ordered or len(a) > 32:  # unordered matching is quadratic, so only for short lists
        return all(_equiv(x, y, depth + 1) for x, y in zip(a, b))
    unused = list(b)
    for x in a:
        hit = next((k for k, y in enumerate(unused) if _equiv(x, y, depth + 1)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _equiv(pred: str, gold: str, depth: int = 0) -> bool:
    a, b = _normalize(pred), _normalize(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return _num_equal(x, y)
    if depth >= 4:  # elements nest at most a few levels deep in real answers; bounds recursion
        return False
    ma, mb = _MATRIX.fullmatch(a), _MATRIX.fullmatch(b)
    if ma or mb:
        if not (ma and mb and ma[1] == mb[1]):
            return False
        rows_a, rows_b = _split_top(ma[2], "\\\\"), _split_top(mb[2], "\\\\")
        return len(rows_a) == len(rows_b) and all(
            _equal_lists(_split_top(r, "&"), _split_top(t, "&"), True, depth) for r, t in zip(rows_a, rows_b))
    ua, ub = _split_top(a, "\\cup"), _split_top(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return _equal_lists(ua, ub, True, depth)
    ba, bb = _bracketed(a), _bracketed(b)
    if ba or bb:  # tuples, intervals, sets: the bracket kinds must agree
        if not (ba and bb and ba[:2] == bb[:2]):
            return False
        return _equal_lists(_split_top(ba[2], ","), _split_top(bb[2], ","), ba[0] != "\\{", depth)
    la, lb = _split_top(a, ","), _split_top(b, ",")
    return (len(la) > 1 or len(lb) > 1) and _equal_lists(la, lb, False, depth)


def is_correct(response: str, gold: str) -> bool:
    if not isinstance(response, str):  # e.g. None from a failed generation
        return False
    gold, pred = str(gold), extract_answer(response)  # str(): SVAMP stores float answers
    if "####" in gold or _BOX.search(gold):  # gold given as a full worked solution
        gold = extract_answer(gold) or ""
    return pred is not None and _equiv(pred, gold)
