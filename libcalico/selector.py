"""Calico label selectors (IPPool `nodeSelector` / `namespaceSelector`).

A hand-written scanner and recursive-descent parser: selectors are evaluated on the
per-invocation path, so this avoids importing anything heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

Labels = Mapping[str, str]

_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")
_SYMBOLS = ("&&", "||", "==", "!=", "!", "(", ")", "{", "}", ",")


class SelectorError(ValueError):
    """A selector string that is not valid Calico selector syntax."""


@dataclass(frozen=True)
class _Token:
    """One lexical token with its position, for error messages."""

    kind: str  # "word", "string", a symbol, or "end"
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "'\"":
            end = text.find(ch, i + 1)
            if end < 0:
                raise SelectorError(f"invalid selector {text!r}: unterminated string at {i}")
            tokens.append(_Token("string", text[i + 1 : end], i))
            i = end + 1
        elif ch in _WORD_CHARS:
            start = i
            while i < len(text) and text[i] in _WORD_CHARS:
                i += 1
            tokens.append(_Token("word", text[start:i], start))
        else:
            symbol = next((s for s in _SYMBOLS if text.startswith(s, i)), None)
            if symbol is None:
                raise SelectorError(f"invalid selector {text!r}: unexpected {ch!r} at {i}")
            tokens.append(_Token(symbol, symbol, i))
            i += len(symbol)
    tokens.append(_Token("end", "", len(text)))
    return tokens


Predicate = Callable[[Labels], bool]

_STRING_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "==": lambda actual, wanted: actual == wanted,
    "contains": lambda actual, wanted: wanted in actual,
    "starts with": str.startswith,
    "ends with": str.endswith,
}


class _Parser:
    """Grammar: or := and ('||' and)*; and := unary ('&&' unary)*;
    unary := '!' unary | '(' or ')' | term."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    def parse(self) -> Predicate:
        predicate = self._or()
        self._expect("end")
        return predicate

    def _peek(self, offset: int = 0) -> _Token:
        return self.tokens[min(self.index + offset, len(self.tokens) - 1)]

    def _next(self) -> _Token:
        token = self._peek()
        self.index += 1
        return token

    def _fail(self, expected: str) -> SelectorError:
        token = self._peek()
        found = token.text or "end of selector"
        return SelectorError(
            f"invalid selector {self.text!r}: expected {expected} at {token.pos}, found {found!r}"
        )

    def _expect(self, kind: str, text: str | None = None) -> _Token:
        token = self._peek()
        if token.kind != kind or (text is not None and token.text != text):
            raise self._fail(repr(text or kind))
        return self._next()

    def _accept_word(self, word: str) -> bool:
        if self._peek().kind == "word" and self._peek().text == word:
            self.index += 1
            return True
        return False

    def _or(self) -> Predicate:
        parts = [self._and()]
        while self._peek().kind == "||":
            self._next()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else lambda labels: any(p(labels) for p in parts)

    def _and(self) -> Predicate:
        parts = [self._unary()]
        while self._peek().kind == "&&":
            self._next()
            parts.append(self._unary())
        return parts[0] if len(parts) == 1 else lambda labels: all(p(labels) for p in parts)

    def _unary(self) -> Predicate:
        if self._peek().kind == "!":
            self._next()
            inner = self._unary()
            return lambda labels: not inner(labels)
        if self._peek().kind == "(":
            self._next()
            inner = self._or()
            self._expect(")")
            return inner
        return self._term()

    def _term(self) -> Predicate:
        token = self._peek()
        if token.kind != "word":
            raise self._fail("a label, all() or has()")
        if token.text in ("all", "global") and self._peek(1).kind == "(":
            self.index += 1
            self._expect("(")
            self._expect(")")
            return lambda labels: True
        if token.text == "has" and self._peek(1).kind == "(":
            self.index += 1
            self._expect("(")
            key = self._expect("word").text
            self._expect(")")
            return lambda labels: key in labels
        key = self._next().text
        return self._comparison(key)

    def _comparison(self, key: str) -> Predicate:
        if self._peek().kind == "!=":
            self._next()
            value = self._expect("string").text
            return lambda labels: labels.get(key) != value
        if self._peek().kind == "==":
            operator = self._next().text
        elif self._accept_word("contains"):
            operator = "contains"
        elif self._peek().text in ("starts", "ends") and self._peek(1).text == "with":
            operator = f"{self._next().text} {self._next().text}"
        elif self._accept_word("in"):
            values = self._string_set()
            return lambda labels: labels.get(key) in values
        elif self._accept_word("not"):
            self._expect("word", "in")
            values = self._string_set()
            return lambda labels: labels.get(key) not in values
        else:
            raise self._fail("an operator (==, !=, in, not in, contains, starts with, ends with)")
        value = self._expect("string").text
        compare = _STRING_OPERATORS[operator]
        return lambda labels: key in labels and compare(labels[key], value)

    def _string_set(self) -> frozenset[str]:
        self._expect("{")
        values: set[str] = set()
        if self._peek().kind != "}":
            values.add(self._expect("string").text)
            while self._peek().kind == ",":
                self._next()
                values.add(self._expect("string").text)
        self._expect("}")
        return frozenset(values)


@dataclass(frozen=True)
class Selector:
    """A parsed selector; `matches` evaluates it against a label map."""

    text: str
    predicate: Predicate

    def matches(self, labels: Labels) -> bool:
        return self.predicate(labels)


def parse_selector(text: str) -> Selector:
    """Parse a Calico selector; an empty selector matches everything, as in Calico."""
    if not text.strip():
        return Selector(text, lambda labels: True)
    return Selector(text, _Parser(text).parse())


def selector_matches(text: str, labels: Labels) -> bool:
    """Convenience for one-off evaluation (pool selection)."""
    return parse_selector(text).matches(labels)
