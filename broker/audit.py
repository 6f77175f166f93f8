"""The audit stream: who took which token, one event per caller and interval.

A caller may ask for a token on every request it makes; one log line per
hand-out would bury everything else and cost a rendered line on the
serving path. Hand-outs are counted per caller, client, listener and
result instead, and each interval ends with one ``audit.tokens_served``
event per combination seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from broker.token import rfc3339

LOGGER = "broker.audit"
# Distinct combinations kept per interval; past this they are only counted,
# so a caller cycling through identities cannot grow memory without end.
MAX_ENTRIES = 10_000
MAX_PIDS = 8

log = structlog.get_logger(LOGGER)


@dataclass(frozen=True)
class Who:
    """A caller as the audit names it: never a key, only a key's name."""

    caller: str
    uid: int | None = None
    key: str | None = None


@dataclass
class _Tally:
    count: int
    first: float
    last: float
    pids: set[int] = field(default_factory=set)


class Audit:
    """Tallies hand-outs and writes them out once per ``interval``."""

    def __init__(self, interval: float, wall: Callable[[], float]) -> None:
        self.interval = interval
        self._wall = wall
        self._tallies: dict[tuple[Who, str, str, str], _Tally] = {}
        self._dropped = 0
        # The audit is not chatter: it stays on whatever log.level says.
        logging.getLogger(LOGGER).setLevel(logging.INFO)

    def record(
        self, who: Who, client: str, listener: str, result: str, pid: int | None
    ) -> None:
        """Count one request of ``who`` for ``client``'s token and its result."""
        now = self._wall()
        key = (who, client, listener, result)

        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= MAX_ENTRIES:
                self._dropped += 1
                return
            tally = self._tallies[key] = _Tally(0, now, now)
        tally.count += 1
        tally.last = now
        if pid is not None and len(tally.pids) < MAX_PIDS:
            tally.pids.add(pid)

    def flush(self) -> int:
        """Write one event per combination seen since the last flush."""
        tallies, self._tallies = self._tallies, {}
        dropped, self._dropped = self._dropped, 0

        for (who, client, listener, result), tally in tallies.items():
            log.info(
                "audit.tokens_served",
                caller=who.caller,
                uid=who.uid,
                # Not "key": the log chain masks a field of that name.
                key_name=who.key,
                pids=sorted(tally.pids),
                client=client,
                listener=listener,
                result=result,
                count=tally.count,
                first_at=rfc3339(tally.first),
                last_at=rfc3339(tally.last),
            )
        if dropped:
            log.warning("audit.overflow", dropped=dropped, limit=MAX_ENTRIES)

        return len(tallies)

    async def run(self) -> None:
        """Flush every interval until cancelled, then flush what is left."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()
