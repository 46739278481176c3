"""Prompt weighting syntaxes: text → fragments of text, each with a weight.

Two syntaxes are in use with SD v1.5; both end as a list of (text, weight) pairs that
`sdlearn.weighted_text` turns into a conditioning tensor.

AUTOMATIC1111's web UI (`parse_a1111`), a port of `parse_prompt_attention` in
modules/prompt_parser.py of github.com/AUTOMATIC1111/stable-diffusion-webui:

    (text)        weight × 1.1              ((text)) × 1.21, and so on: nesting multiplies
    [text]        weight ÷ 1.1
    (text:1.3)    weight × 1.3              spaces allowed around the number: (text: 1.3 )
    \\( \\) \\[ \\]   the literal bracket         \\\\ a literal backslash
    BREAK         (a word in capitals) ends the current chunk of 75 tokens here
    an unclosed ( or [ counts as closed at the end; a ")" or "]" with no opener is text
    neighbouring pieces of equal weight are merged; nothing at all gives [("", 1.0)]

    parse_a1111("a (red:1.3) circle")  →  [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]

The web UI's prompt editing (`[from:to:when]`) and its composition with `AND` are other
features of the web UI, run before this parser; they are not supported here (such text is read
by this parser alone, as the rules above say).

compel's syntax (`parse_compel`), as compel 2.5.1's `PromptParser` (compel/prompt_parser.py)
reads it; the brackets alone do nothing, the weight follows them:

    word+  word++  word-     weight × 1.1ⁿ for n pluses, × 0.9ⁿ for n minuses
    (several words)1.3       weight × 1.3; also "quoted words"1.3 and (words)+, (words)--
    (words).attend(1.3)      the same, spelled out
    ("a cat", "a dog").blend(0.7, 0.3)     a weighted mean of the two conditionings
                                           (weights divided by their sum, unless the last
                                           option is `no_normalize`)
    ("a cat", "a dog").and()               the two conditionings side by side (77 + 77 tokens)
    \\( \\) \\"                  literal characters

Nesting multiplies; neighbouring fragments of equal weight are joined with a space; compel first
writes a space after every comma that lacks one. `.swap()` (prompt-to-prompt) and `withLora()`
are refused with a ValueError. A `.blend()` or `.and()` must be the whole prompt.

    parse_compel("a red+ circle")  →  Prompt([("a", 1.0), ("red", 1.1), ("circle", 1.0)])
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

SYNTAXES = (None, "compel", "a1111")


def check_syntax(name) -> str | None:
    """`prompt_syntax` as given, or a ValueError that lists the choices."""
    if name not in SYNTAXES:
        raise ValueError(f"prompt_syntax={name!r}: expected None (plain text, as diffusers), 'compel' "
                         "(the compel library's word+ and (words)1.3) or 'a1111' (the web UI's (word:1.3))")
    return name


# -- AUTOMATIC1111 -------------------------------------------------------------------------------

# One match per token of the web UI's grammar, in its order (modules/prompt_parser.py, re_attention).
_A1111_TOKEN = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|     # escapes, and a lone backslash
\(|\[|                          # openers
:\s*([+-]?[.\d]+)\s*\)|         # ":1.3)" closes a round bracket with an explicit weight
\)|]|                           # closers
[^\\()\[\]:]+|                  # plain text
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = ("BREAK", -1.0)          # the web UI's marker for a chunk break


def parse_a1111(text: str) -> list[tuple[str, float]]:
    """The web UI's emphasis syntax → [(text, weight), …]; BREAK appears as ("BREAK", -1.0).

    Each opener remembers where its text starts; its closer multiplies the weights of every
    piece from there to the end by 1.1, 1/1.1 or the explicit number.
    """
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _A1111_TOKEN.finditer(text):
        token, number = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif number is not None and round_open:
            multiply_from(round_open.pop(), float(number))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:                      # unclosed brackets close at the end
        multiply_from(start, 1.1)
    for start in square_open:
        multiply_from(start, 1 / 1.1)
    return merge_equal_weights([tuple(p) for p in pieces] or [("", 1.0)], sep="")


def merge_equal_weights(pieces: list[tuple[str, float]], sep: str) -> list[tuple[str, float]]:
    """Join neighbours of equal weight: [("a", 1), ("b", 1), ("c", 2)] → [("a" + sep + "b", 1), ("c", 2)]."""
    out: list[tuple[str, float]] = []
    for text, weight in pieces:
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + sep + text, weight)
        else:
            out.append((text, weight))
    return out


# -- compel --------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """A flat list of (text, weight) fragments, encoded as one sequence."""
    fragments: list[tuple[str, float]]


@dataclass
class Blend:
    """A weighted mean of the conditionings of several prompts (`.blend(…)`)."""
    prompts: list[Prompt]
    weights: list[float]
    normalize: bool = True


@dataclass
class Conjunction:
    """Parts whose conditionings are concatenated along the tokens (`.and(…)`); weight w ≠ 1
    moves a part's conditioning from the empty prompt's: empty + w · (part − empty)."""
    parts: list[Prompt | Blend]
    weights: list[float] = field(default_factory=list)


_SYNTAX_CHARS = '()",.+-='
_ESCAPES = ('\\(', '\\)', '\\"', '\\,', '\\.', '\\+', '\\-', '\\=')
_NUMBER = re.compile(r"\d+\.\d*|\.\d+|\d+")                      # pyparsing_common.real, then an integer
_ATTEND = re.compile(r"\.attend\(\s*(\++|-+|\d+\.\d*|\.\d+|-?\d+)\s*\)")
_OPERATOR = re.compile(r"\s*\.(blend|and|add)\(([^()]*)\)\s*$")


class _CompelReader:
    """A recursive-descent reader of compel's grammar (the subset documented above)."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    # characters
    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        while not self.at_end() and self.text[self.pos].isspace():
            self.pos += 1

    def refuse_unsupported(self) -> None:
        rest = self.text[self.pos:]
        for name in (".swap(", "withLora(", "useLora("):
            if rest.startswith(name) or re.match(r"[^\s()]*" + re.escape(name), rest):
                raise ValueError(f"compel's {name.rstrip('(')}() is not supported by sdlearn "
                                 f"(in {self.text!r}); remove it or use plain weights")

    def word(self) -> str | None:
        """compel's non_syntax_word: escapes, digits, + or - inside a word, other non-syntax characters."""
        start, t = self.pos, self.text
        while not self.at_end():
            c, nxt = t[self.pos], t[self.pos + 1:self.pos + 2]
            if t[self.pos:self.pos + 2] in _ESCAPES:
                self.pos += 2
            elif c in "+-" and nxt and not nxt.isspace() and nxt not in _SYNTAX_CHARS:
                self.pos += 1
            elif not c.isspace() and c not in _SYNTAX_CHARS:
                self.pos += 1
            else:
                break
        return t[start:self.pos] if self.pos > start else None

    def weight_after(self, allow_number: bool = True) -> float | None:
        """A weight operator right after a target (no space): +…, -…, a number or .attend(w)."""
        for sign, base in (("+", 1.1), ("-", 0.9)):
            n = len(self.text[self.pos:]) - len(self.text[self.pos:].lstrip(sign))
            if n:
                self.pos += n
                return base ** n
        if allow_number:
            m = _NUMBER.match(self.text, self.pos)
            if m:
                self.pos = m.end()
                return float(m.group(0))
        m = _ATTEND.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            w = m.group(1)
            return (1.1 if w[0] == "+" else 0.9) ** len(w) if w[0] in "+-" and not w.strip("+-") else float(w)
        return None

    def group(self) -> list | None:
        """A parenthesised or quoted group: its items as a list (weight 1), or None if none here."""
        start = self.pos
        if self.peek() == '"':
            end = self.pos + 1
            while end < len(self.text) and (self.text[end] != '"' or self.text[end - 1] == "\\"):
                end += 1
            if end >= len(self.text):
                return None
            inner = _CompelReader(self.text[self.pos + 1:end].replace('\\"', '"').replace('"', '\\"'))
            items = inner.items(inside=True)
            if inner.at_end():
                self.pos = end + 1
                return items if inner.text.strip() else [("", 1.0)]
        elif self.peek() == "(":
            self.pos += 1
            items = self.items(inside=True)
            if self.peek() == ")":
                self.pos += 1
                return items
        self.pos = start
        return None

    def items(self, inside: bool) -> list:
        """A sequence of words, weighted targets and groups: a list of (text, weight) and lists,
        each list a weighted group [(weight, items)]."""
        out: list = []
        while True:
            self.skip_space()
            if self.at_end() or (inside and self.peek() == ")"):
                return out
            self.refuse_unsupported()
            start = self.pos
            group = self.group()
            if group is not None:
                weight = self.weight_after()
                out.append((weight if weight is not None else 1.0, group))
                continue
            word = self.word()
            if word is not None:
                weight = self.weight_after(allow_number=False)
                if weight is not None:
                    out.append((weight, [(word, 1.0)]))
                    continue
                if inside:
                    out.append((word, 1.0))
                    continue
                self.pos = start
            if inside:
                if self.peek() in (",", "."):
                    out.append((self.peek(), 1.0))
                    self.pos += 1
                    continue
                return out                       # something the inner grammar cannot read
            end = self.pos                       # top level: compel's free_word, up to a space
            while end < len(self.text) and not self.text[end].isspace():
                end += 1
            out.append((self.text[self.pos:end], 1.0))
            self.pos = end


def _flatten(items: list, scale: float = 1.0) -> list[tuple[str, float]]:
    """Nested (weight, items) groups → flat fragments, each weight the product of its groups'."""
    out = []
    for item in items:
        if isinstance(item[1], list):
            out += _flatten(item[1], scale * item[0])
        else:
            text = item[0].replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')
            out.append((text, item[1] * scale))
    return out


def _prompt(text: str) -> Prompt:
    reader = _CompelReader(text)
    items = reader.items(inside=False)
    return Prompt(merge_equal_weights(_flatten(items), sep=" "))


def _target_prompts(inner: str, whole: str) -> list[Prompt]:
    """The comma-separated targets of .blend()/.and(): quoted prompts or parenthesised fragments."""
    reader, prompts = _CompelReader(inner), []
    while True:
        reader.skip_space()
        if reader.peek() == '"':
            group = reader.group()
            if group is None:
                raise ValueError(f"cannot read the quoted prompt at {inner[reader.pos:]!r} in {whole!r}")
            prompts.append(Prompt(merge_equal_weights(_flatten([(1.0, group)]), sep=" ")))
        else:
            start = reader.pos
            group = reader.group()
            if group is None:
                word = reader.word()
                if word is None:
                    raise ValueError(f"expected a quoted prompt at {inner[start:]!r} in {whole!r}")
                group = [(word, 1.0)]
            prompts.append(Prompt(merge_equal_weights(_flatten([(1.0, group)]), sep=" ")))
        reader.skip_space()
        if reader.at_end():
            return prompts
        if reader.peek() != ",":
            raise ValueError(f"expected ',' between the prompts of {whole!r}, found {inner[reader.pos:]!r}")
        reader.pos += 1


_A1111_WEIGHT = re.compile(r"\([^()]*:\s*[+-]?[\d.]+\s*\)")


def parse_compel(text: str) -> Conjunction:
    """compel's syntax → a Conjunction of Prompts and Blends (usually one Prompt, weight 1)."""
    if _A1111_WEIGHT.search(text):
        warnings.warn(f"{text!r} looks like the web UI's (word:1.3), which compel reads as plain text; "
                      "compel writes (word)1.3, or use prompt_syntax='a1111'", stacklevel=2)
    text = re.sub(r",(\S)", r", \1", text)                  # compel: a space after every comma
    if not text.strip():
        return Conjunction([Prompt([("", 1.0)])], [1.0])
    whole = text.strip()
    m = _OPERATOR.search(whole)
    if m and whole.startswith("(") and whole[:m.start()].endswith(")"):
        prompts = _target_prompts(whole[1:m.start() - 1], text)
        options = [o.strip() for o in m.group(2).split(",") if o.strip()]
        normalize = not (options and options[-1] == "no_normalize")
        weights = [float(o) for o in (options if normalize else options[:-1])] or [1.0] * len(prompts)
        if len(weights) != len(prompts):
            raise ValueError(f"{text!r}: {len(prompts)} prompts but {len(weights)} weights")
        if m.group(1) == "blend":
            return Conjunction([Blend(prompts, weights, normalize)], [1.0])
        return Conjunction(list(prompts), weights)
    if re.search(r"\)\.(blend|and|add)\(", text):
        raise ValueError(f"{text!r}: a .blend() or .and() must be the whole prompt, as in "
                         "'(\"a red circle\", \"a blue square\").blend(0.7, 0.3)'")
    return Conjunction([_prompt(text)], [1.0])


def plain_text(text: str, syntax: str | None) -> str:
    """The words a prompt asks for, without its syntax (weights, brackets, BREAK, .blend(…)):
    what a model's vocabulary check should read. Plain text (syntax None) is returned as is."""
    if check_syntax(syntax) is None:
        return text
    if syntax == "a1111":
        return " ".join(piece for piece, weight in parse_a1111(text) if (piece, weight) != BREAK)
    parts = []
    for part in parse_compel(text).parts:
        for prompt in (part.prompts if isinstance(part, Blend) else [part]):
            parts += [piece for piece, _ in prompt.fragments]
    return " ".join(parts)
