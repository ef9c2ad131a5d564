"""Text that PostgreSQL can store as given: request models use it for every string a client sends.

PostgreSQL's text and jsonb refuse U+0000, and a lone surrogate (JSON allows "\\ud800") cannot be
encoded as UTF-8 at all; either would fail deep in a handler as a 500 or a lost message. Refused at
the door instead, the client gets a 422 naming the field. Every other character, control characters
included, is stored faithfully. `RequiredText` is for the fields that must say something: blank text
(empty, or only whitespace) is refused there too, with a 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (a lone surrogate such as \\ud800 is not)") from None
    return value


StorableText = Annotated[str, AfterValidator(storable)]


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


RequiredText = Annotated[StorableText, AfterValidator(not_blank)]
