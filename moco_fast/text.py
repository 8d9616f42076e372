"""Words of the lines shown to users that depend on a count: "1 epoch", "2 epochs"."""

from __future__ import annotations


def plural(n: int, word: str, words: str | None = None) -> str:
    """`n` and `word`, or `words` (default: `word` + "s") where `n` is not 1: a run of --epochs 1
    said "1 epochs"."""
    return f"{n} {word if n == 1 else words or word + 's'}"
