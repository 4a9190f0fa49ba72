"""The one exception of the data layer."""

from __future__ import annotations

from ..errors import ModnetError


class DataError(ModnetError, ValueError):
    """A data problem the user can fix; the message names the problem and the fix.

    A ``ValueError`` so that callers that already handle bad arguments handle
    bad data too; the CLI prints the message without a traceback.
    """
