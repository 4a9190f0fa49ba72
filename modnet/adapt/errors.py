"""The error adaptation raises for what it cannot do with the input it got."""

from __future__ import annotations

from ..errors import ModnetError


class AdaptationError(ModnetError, ValueError):
    """Adaptation cannot run as asked: the message names the problem and the fix."""
