"""Tokens for a subset of a client's scopes, fetched when first asked for.

``GET /v1/tokens/{client}?scope=a b`` asks for fewer scopes than the client
is configured with (least privilege per call site). Each (client, scope set)
gets its own refresher, kept in a bounded cache: an entry lives exactly as
long as its token, is refreshed while callers keep asking for it, and is
dropped when a whole token lifetime passes without a caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from cachetools import TLRUCache

from broker.clock import Clock
from broker.issuer import IssuerClient
from broker.metrics import Metrics
from broker.ratelimit import RateLimiter
from broker.refresh import OnToken, Refresher
from broker.registry import Registry
from broker.token import Token


@dataclass(frozen=True)
class Variant:
    """What a caller asked for beyond the client's own token."""

    scopes: tuple[str, ...]
    audience: str | None = None


Key = tuple[str, Variant]
# Builds a refresher for a client and a variant; ``keep_going`` tells it
# whether anyone asked since its last token, ``on_token`` is its hook.
Build = Callable[[str, Variant, Callable[[], bool], OnToken], Refresher]

# An entry whose first token has not come yet lives this long at most.
PENDING_SECONDS = 60.0
DEFAULT_MAX_ENTRIES = 256
# New scope sets (or audiences) a client may start per minute. A caller
# cycling through more sets than the cache holds would otherwise make every
# one of its requests a request to the issuer.
NEW_SETS_PER_MINUTE = 60


def normalise(requested: str) -> tuple[str, ...]:
    """The scope set of a ``scope`` parameter: split, deduplicated, sorted."""
    return tuple(sorted(set(requested.split())))


@dataclass
class Entry:
    """One cached scope set: its refresher, its loop, and recent use."""

    refresher: Refresher = field(init=False)
    task: asyncio.Task[None] | None = None
    used: bool = True

    def take_use(self) -> bool:
        """Whether it was used since the last call; resets the mark."""
        used, self.used = self.used, False
        return used

    def stop(self) -> None:
        self.refresher.cancel()
        if self.task is not None:
            self.task.cancel()


class _Cache(TLRUCache[Key, Entry]):
    """A TLRU cache that stops the loops of the entries it lets go."""

    def popitem(self) -> tuple[Key, Entry]:
        key, entry = super().popitem()
        entry.stop()
        return key, entry

    def expire(self, time: float | None = None) -> list[tuple[Key, Entry]]:
        expired: list[tuple[Key, Entry]] = list(super().expire(time))
        for _, entry in expired:
            entry.stop()
        return expired


class ScopedTokens:
    """The cache of scope-subset tokens, for every client."""

    def __init__(
        self, build: Build, clock: Clock, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self._build = build
        self._cache = _Cache(max_entries, ttu=_until_expiry, timer=clock.now)
        per_minute = NEW_SETS_PER_MINUTE
        self._new = RateLimiter(per_minute / 60, per_minute, clock.now)

    def __len__(self) -> int:
        return len(self._cache)

    def admit(self, client: str, variant: Variant) -> float:
        """0 when ``variant`` is cached or may be started now; else the
        seconds until ``client`` may start another one."""
        if (client, variant) in self._cache:
            return 0.0
        return self._new.wait(client)

    def refresher(self, client: str, variant: Variant) -> Refresher:
        """The refresher of ``client`` for ``variant``, started on first use.

        Marks the entry as used, so its loop keeps the token fresh.
        """
        key = (client, variant)
        entry = self._cache.get(key)
        if entry is None:
            entry = Entry()

            async def follow(token: Token) -> None:
                self.settle(client, variant)

            entry.refresher = self._build(client, variant, entry.take_use, follow)
            entry.task = asyncio.create_task(
                entry.refresher.run(), name=f"scoped-{client}"
            )
            self._cache[key] = entry
        entry.used = True

        return entry.refresher

    def settle(self, client: str, variant: Variant) -> None:
        """Let the entry's life follow the token it now holds."""
        key = (client, variant)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache[key] = entry

    def entries(self, client: str) -> list[tuple[Variant, Refresher]]:
        """The cached variants of one client and their refreshers (status)."""
        return [
            (key[1], self._cache[key].refresher)
            for key in list(self._cache)
            if key[0] == client and key in self._cache
        ]

    def drop(self, client: str) -> None:
        """Forget every scope set of a client (removed or changed)."""
        for key in [key for key in list(self._cache) if key[0] == client]:
            entry = self._cache.pop(key, None)
            if entry is not None:
                entry.stop()

    def close(self) -> None:
        """Stop every loop (at shutdown)."""
        for key in list(self._cache):
            entry = self._cache.pop(key, None)
            if entry is not None:
                entry.stop()


def builder(
    registry: Registry, issuer: IssuerClient, clock: Clock, metrics: Metrics
) -> Build:
    """Build scope-subset refreshers from the registry's current config."""

    def build(
        name: str,
        variant: Variant,
        keep_going: Callable[[], bool],
        on_token: OnToken,
    ) -> Refresher:
        config = registry.config
        spec = config.clients[name]
        spec = spec.model_copy(
            update={
                "scopes": variant.scopes,
                "audience": variant.audience or spec.audience,
            }
        )
        policy = config.policy(name)
        fetch = partial(
            issuer.fetch,
            spec,
            config.environments[spec.environment],
            policy.timeout,
            spec.environment,
            name,
        )
        return Refresher(
            name,
            spec.environment,
            variant.scopes,
            policy,
            fetch,
            clock=clock,
            metrics=metrics,
            give_up=registry.give_up,
            scoped=True,
            keep_going=keep_going,
            on_token=on_token,
        )

    return build


def _until_expiry(key: Key, entry: Entry, now: float) -> float:
    token = entry.refresher.token
    if token is None:
        return now + PENDING_SECONDS
    return token.expires_at
