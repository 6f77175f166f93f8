"""The error tree: one base, and one class per kind of failure callers handle."""

from __future__ import annotations

from collections.abc import Sequence


class BrokerError(Exception):
    """Base of every error token-broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration is unusable; names the file, the key path and why."""

    def __init__(self, file: str, path: Sequence[str | int], reason: str) -> None:
        self.file = file
        self.path = tuple(path)
        self.reason = reason
        super().__init__(str(self))

    @property
    def key_path(self) -> str:
        """The dotted key path, ``clients.chat.scopes[1]`` style."""
        text = ""
        for part in self.path:
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += f".{part}" if text else str(part)
        return text or "(top level)"

    def __str__(self) -> str:
        return f"{self.file}: {self.key_path}: {self.reason}"


class IssuerError(BrokerError):
    """One token request failed; ``reason`` is the shared classification code.

    ``permanent`` errors (a wrong secret, a scope the client may not have) will
    not heal by retrying soon, so the refresh schedule backs off long.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        permanent: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.reason = reason
        self.message = message
        self.status = status
        self.permanent = permanent
        self.retry_after = retry_after
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class TokenUnavailable(BrokerError):
    """No servable token for a client right now."""

    def __init__(
        self, client: str, reason: str, message: str, retry_after: float
    ) -> None:
        self.client = client
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        super().__init__(message)
