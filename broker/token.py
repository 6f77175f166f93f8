"""A held access token and the answers prepared from it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from broker.secret import Secret


@dataclass(frozen=True, slots=True)
class Grant:
    """What one successful token response said, normalised.

    ``expires_in`` is ``None`` when the issuer gave no usable lifetime.
    """

    access_token: Secret
    expires_in: float | None
    scope: str | None


@dataclass(frozen=True, slots=True)
class Token:
    """A token in the cache, timed on the broker's suspend-aware clock."""

    value: Secret
    lifetime: float
    obtained_at: float
    obtained_wall: float
    scope: str
    margin: float
    refresh_at: float
    expires_iso: str

    @property
    def expires_at(self) -> float:
        """When the issuer stops accepting it, on the broker's clock."""
        return self.obtained_at + self.lifetime

    @property
    def expires_wall(self) -> float:
        """When it expires, as a Unix timestamp (for display and metrics)."""
        return self.obtained_wall + self.lifetime

    @property
    def serve_until(self) -> float:
        """The last moment it may be handed out: expiry less the margin."""
        return self.expires_at - self.margin

    @property
    def header(self) -> str:
        """The ``Authorization`` header value callers send with it."""
        return "Bearer " + self.value.reveal()

    def servable(self, now: float, min_ttl: float = 0.0) -> bool:
        """True when it may be served and lives ``min_ttl`` more seconds."""
        return now < self.serve_until and self.expires_at - now >= min_ttl


def rfc3339(timestamp: float) -> str:
    """A Unix time as RFC 3339 UTC to the second, as the API shows times."""
    return datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
