"""One planted bug: an exact edit (its original text must occur once in the code) and the tests that must then
fail."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str  # the bug it plants
    edits: tuple[tuple[str, str, str], ...]  # (file, original text, planted text)
    tests: tuple[str, ...]  # pytest node ids or files that must fail


CLOSED_FORM = "tests/test_rules_closed_form.py"
