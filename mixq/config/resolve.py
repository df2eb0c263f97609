"""Resolve each tensor name to a precision with the weight_mapping rules.

Rules, in order:
1. an exact key (no wildcard, no ``re:`` prefix) equal to the tensor name;
2. otherwise the most specific pattern that matches: ``*``/``?``/``[...]`` globs
   (fnmatch: ``*`` also crosses dots) or ``re:<regex>`` (full match). Specificity is the
   number of characters a pattern matches literally; a tie between two patterns that
   give *different* precisions is an error (equal precisions agree, so no ambiguity);
3. otherwise the base ("fp16").

A key that matches no tensor is an error: it is almost always a typo.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mixq.errors import ConfigError

BASE_PRECISION = "fp16"


@dataclass(frozen=True)
class Rule:
    """One weight_mapping entry, compiled."""

    key: str
    precision: str
    exact: bool
    specificity: int
    regex: re.Pattern[str]

    def matches(self, name: str) -> bool:
        return self.regex.fullmatch(name) is not None


@dataclass(frozen=True)
class Resolution:
    """Where a tensor's precision came from: the rule key, or None for the base."""

    precision: str
    rule: str | None


def _glob_specificity(pattern: str) -> int:
    n, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            j = pattern.find("]", i + 1)
            if j != -1:
                i = j + 1
                continue
        if c not in "*?":
            n += 1
        i += 1
    return n


def _regex_specificity(pattern: str) -> int:
    """Literal characters: word characters outside escapes, plus escaped punctuation."""
    n, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            # \. \- are literals; \d \w \s are classes
            n += 0 if pattern[i + 1].isalnum() else 1
            i += 2
            continue
        if c.isalnum() or c == "_":
            n += 1
        i += 1
    return n


def compile_rule(key: str, precision: str) -> Rule:
    """Compile a mapping key into a Rule; a bad regex is a ConfigError naming the key."""
    if key.startswith("re:"):
        body = key[3:]
        try:
            rx = re.compile(body)
        except re.error as e:
            raise ConfigError(f"weight_mapping[{key!r}]: invalid regular expression: {e}") from None
        return Rule(key, precision, False, _regex_specificity(body), rx)
    if any(c in key for c in "*?["):
        return Rule(key, precision, False, _glob_specificity(key), re.compile(fnmatch.translate(key)))
    return Rule(key, precision, True, len(key), re.compile(re.escape(key)))


class PrecisionResolver:
    """Maps tensor names to precisions per the rules in this module's docstring."""

    def __init__(self, mapping: Mapping[str, str], source: str = "<config>"):
        self.source = source
        rules = [compile_rule(k, v) for k, v in mapping.items()]
        self.exact = {r.key: r for r in rules if r.exact}
        self.patterns = sorted((r for r in rules if not r.exact), key=lambda r: -r.specificity)

    def resolve(self, name: str) -> Resolution:
        """The precision for one tensor name."""
        if name in self.exact:
            r = self.exact[name]
            return Resolution(r.precision, r.key)
        best: Rule | None = None
        for r in self.patterns:
            if best is not None and r.specificity < best.specificity:
                break
            if not r.matches(name):
                continue
            if best is None:
                best = r
            elif r.precision != best.precision:
                raise ConfigError(
                    f"mixed-precision config {self.source}: tensor {name!r} is matched by "
                    f"{best.key!r} ({best.precision}) and {r.key!r} ({r.precision}) with equal "
                    "specificity; add an exact key or make one pattern more specific"
                )
        if best is None:
            return Resolution(BASE_PRECISION, None)
        return Resolution(best.precision, best.key)

    def resolve_all(self, names: Iterable[str], base: str = "the base checkpoint") -> dict[str, Resolution]:
        """Resolve every name; a key that matched none of them is a ConfigError naming
        `base` (where the names come from)."""
        names = list(names)
        out = {n: self.resolve(n) for n in names}
        known = set(names)
        for key in self.exact:
            if key not in known:
                raise ConfigError(
                    f"mixed-precision config {self.source}: weight_mapping[{key!r}]: "
                    f"no such tensor in {base}"
                )
        for r in self.patterns:
            if not any(r.matches(n) for n in names):
                raise ConfigError(
                    f"mixed-precision config {self.source}: weight_mapping[{r.key!r}]: "
                    f"pattern matches no tensor in {base}"
                )
        return out
