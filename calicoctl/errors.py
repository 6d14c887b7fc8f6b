"""The one exception the admin commands raise for an operator's mistake or a refusal."""

from __future__ import annotations


class CommandError(Exception):
    """Printed as one line on stderr; the command exits 1 and has changed nothing."""
