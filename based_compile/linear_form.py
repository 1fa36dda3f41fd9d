"""The linear (cumsum) feature-map form (placeholder until matched)."""
from __future__ import annotations

from .refusal import NotACandidate


def match_linear(matcher, node):
    raise NotACandidate("linear form not matched yet")
