"""The one error shape for a bad value: which field, and what would be accepted.

A policy spec (`PolicyError`, with the spec path), a setting of the operator
or the gate, a knob, a request and a scenario file all fail the same way, so
that every entry point reports `field: message` and callers can read `.field`
to point at it.
"""

from __future__ import annotations


class FieldError(ValueError):
    """A value is invalid; `field` names the offending key ("" when the
    problem is the whole document), `message` says what would be accepted."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
