"""Why a candidate was not rewritten: the exception the matcher raises, with its category."""
from __future__ import annotations

CATEGORIES = ("polynomial", "mask", "normaliser", "feature_map", "state", "verify", "unsupported")


class Refused(Exception):
    """A candidate that looked like Based attention but is not exactly that function.

    category: one of CATEGORIES; reason: a sentence for explain().
    """

    def __init__(self, category: str, reason: str, node=None):
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        super().__init__(f"{category}: {reason}")
        self.category = category
        self.reason = reason
        self.node = node


class NotACandidate(Exception):
    """Nothing here looks like Based attention (no refusal is reported)."""
