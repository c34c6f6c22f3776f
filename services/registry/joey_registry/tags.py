"""Tags of models and pipelines, and the filters of searches: what the registry accepts."""

from __future__ import annotations

import re

from joey_registry.errors import InvalidArgument

TAG_PATTERN = re.compile(r"[a-z0-9][a-z0-9._:-]{0,63}")
MAX_TAGS = 50
"""Per model or pipeline: tags name kinds of things, and a listing prints them all."""
MAX_SEARCH_TERM_CHARS = 200


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.fullmatch(tag):
        hint = f" (tags are lowercase: {tag.lower()!r})" if TAG_PATTERN.fullmatch(tag.lower()) else ""
        raise InvalidArgument(
            f"tag {tag!r} refused{hint}: a tag is 1 to 64 lowercase letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return tag


def check_search_term(term: str) -> str | None:
    """The term to search for (None for no term): surrounding spaces do not count."""
    term = term.strip()
    if len(term) > MAX_SEARCH_TERM_CHARS:
        raise InvalidArgument(f"the search term is longer than {MAX_SEARCH_TERM_CHARS} characters")
    return term or None
