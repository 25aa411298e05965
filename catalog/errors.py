"""Errors a user can fix, as one family: the CLI prints them as one line, everything else with a traceback.

A bare ``ValueError`` or ``FileNotFoundError`` from deep inside a run is a bug until proven otherwise,
so only these classes (and their subclasses in other rooms) are treated as the user's to fix.
"""

from __future__ import annotations

import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 4
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlong = 40


class UserError(Exception):
    """Bad input, a bad setting or a catalog in a state the command cannot continue from; the message says
    what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A table, file or folder the command needs does not exist (yet): the message names the stage that makes it."""


def short_repr(value: object) -> str:
    """``repr`` capped in depth and length, so an error message never formats a huge (or self-expanding) value."""
    return _SHORT.repr(value)
