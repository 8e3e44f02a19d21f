"""The one error type for a user's mistake and the one way to raise it with the key named."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config or input mistake; the message names the key (or file) and the fix."""


def fail(key: str, message: str) -> None:
    """Raises ConfigError("<key>: <message>")."""
    raise ConfigError(f"{key}: {message}")
