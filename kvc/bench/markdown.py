"""Markdown for the bench's reports."""
from __future__ import annotations


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the head, the rule, a line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
