"""One-line error messages, as the front doors and config checks report them."""

from __future__ import annotations

__all__ = ["first_line", "typed_first_line"]


def first_line(error: BaseException) -> str:
    """The first line of the error's message, or its type's name when the message is empty.

    Example:
        >>> first_line(ValueError("bad value\\nmore detail"))
        'bad value'
        >>> first_line(KeyError())
        'KeyError'
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def typed_first_line(error: BaseException) -> str:
    """``"Type: first line"``: the error's type and the first line of its message, as
    reports that list many failures give them (the type alone for an empty message).

    Example:
        >>> typed_first_line(ValueError("bad value\\nmore detail"))
        'ValueError: bad value'
        >>> typed_first_line(KeyError())
        'KeyError'
    """
    name = type(error).__name__
    return f"{name}: {first_line(error)}" if str(error).strip() else name
