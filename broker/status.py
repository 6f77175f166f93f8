"""``token-broker status``: the broker's client states as a table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

COLUMNS = ("CLIENT", "SCOPES", "STATE", "EXPIRES", "REFRESH", "FAILURES", "LAST ERROR")


def table(answer: Mapping[str, Any], now: datetime | None = None) -> str:
    """Render ``GET /v1/clients`` as aligned text, one row per scope set.

    Times are shown relative to ``now`` (``in 47m``, ``3s ago``).
    """
    moment = now or datetime.now(UTC)
    rows: list[Sequence[str]] = [COLUMNS]
    for client in answer.get("clients", []):
        rows.append(_row(client["name"], client, moment))
        for subset in client.get("scoped", []):
            rows.append(_row("  └ " + client["name"], subset, moment))

    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


def _row(name: str, state: Mapping[str, Any], now: datetime) -> tuple[str, ...]:
    error = state.get("last_error") or {}
    return (
        name,
        " ".join(state.get("scopes", [])) or "-",
        str(state.get("state", "?")),
        _relative(state.get("expires_at"), now),
        _relative(state.get("refresh_at"), now),
        str(state.get("consecutive_failures", 0)),
        str(error.get("reason", "-")),
    )


def _relative(stamp: str | None, now: datetime) -> str:
    if not stamp:
        return "-"
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    seconds = int((moment - now).total_seconds())
    span = abs(seconds)
    text = (
        f"{span}s"
        if span < 120
        else f"{span // 60}m"
        if span < 7200
        else f"{span // 3600}h"
    )
    return f"in {text}" if seconds >= 0 else f"{text} ago"
