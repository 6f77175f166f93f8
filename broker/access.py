"""Per-request access decisions: who is calling, and may they have this token.

The guard (:mod:`broker.guard`) keeps out requests no local process made on
purpose; this module decides among local callers, with their peer
credentials (Unix socket) and caller keys (either listener).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aiohttp import web

from broker.audit import Who
from broker.callers import Caller, Callers, match, peer_of

ANY = "any"


@dataclass(frozen=True)
class Verdict:
    """The outcome for one caller and one client's token."""

    allowed: bool
    # The rule that matched, as the metrics' caller label (bounded).
    rule: str
    who: Who
    message: str = ""


def caller_of(request: web.Request, listener: str) -> Caller:
    """The caller of ``request``: its peer credentials and any bearer key."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    peer = peer_of(sock) if listener == "unix" else None

    return Caller(listener, peer, _bearer(request))


def _bearer(request: web.Request) -> str | None:
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    scheme, _, key = values[0].strip().partition(" ")
    if len(values) != 1 or scheme.lower() != "bearer" or not key.strip():
        # Present but unusable: compared like a wrong key, never ignored.
        return ""
    return key.strip()


def decide(callers: Callers | None, caller: Caller) -> Verdict:
    """Whether ``caller`` may take a token guarded by ``callers``."""
    peer = caller.peer
    uid = None if peer is None else peer.uid
    anonymous = Who(f"uid:{uid}" if uid is not None else caller.listener, uid)
    if callers is None:
        return Verdict(True, ANY, anonymous)

    rule = match(callers, caller)
    if rule is None:
        return Verdict(False, "none", anonymous, _why(callers, caller))
    key = rule.removeprefix("key:") if rule.startswith("key:") else None

    return Verdict(True, rule, Who(rule if key else anonymous.caller, uid, key))


def may_quit(callers: Callers | None, caller: Caller) -> bool:
    """Whether ``caller`` may stop the broker with ``POST /v1/quit``.

    Without ``quit_callers``: our own user, who could signal us anyway, and
    root.
    """
    if callers is not None:
        return match(callers, caller) is not None
    peer = caller.peer
    return peer is not None and peer.uid in (os.getuid(), 0)


def _why(callers: Callers, caller: Caller) -> str:
    if caller.bearer is not None:
        return "the caller key is not one of this client's keys"
    if caller.peer is None and not callers.keys:
        return (
            "this client serves only callers on the Unix socket with an allowed "
            "uid or gid"
        )
    hint = "send this client's caller key as 'Authorization: Bearer <key>'"
    if caller.peer is None:
        return hint
    refused = f"{caller.describe()} is not among this client's callers"
    return f"{refused}; {hint}" if callers.keys else refused
