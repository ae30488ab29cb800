"""The one base class of the errors that describe a user's input (config, data, files) rather than a bug.

Their message is the report: a single run prints `error: <kind>: <message>` and exits without a traceback
(train.py). Every such error class subclasses `UserError` where it is defined; nothing here imports them. A corrupt
cache is not among them: it is rebuilt, never reported (fpet.data.cache).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix; the message names the key or file, the bad value and the fix."""


def user_message(err: BaseException) -> str:
    """`err`'s message; for an error a DataLoader worker raised (re-raised with the worker's traceback in the
    message), only the original message."""
    text = str(err)
    if "Original Traceback" in text:
        marker = f"{type(err).__module__}.{type(err).__qualname__}: "
        text = text[text.rfind(marker) + len(marker):] if marker in text else text.rstrip().splitlines()[-1]
    return text.strip()
