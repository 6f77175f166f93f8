"""What proves a client's identity on one token request, read fresh each time.

A client secret (from a file, re-read for every request), a signed
assertion made from a private key (private_key_jwt), or nothing beyond the
TLS client certificate (tls_client_auth). Files are read at the moment of
use, so a rotated secret, key or certificate needs no restart.
"""

from __future__ import annotations

import hashlib

from broker.config import Client
from broker.errors import IssuerError
from broker.secret import Secret


def credential(client: Client, token_url: str) -> Secret | None:
    """The credential to send now; raises ``IssuerError`` when unreadable."""
    try:
        if client.auth == "private_key_jwt":
            from broker import assertion

            audience = client.assertion_audience or token_url
            return assertion.client_assertion(client, audience)
        if client.client_secret is not None:
            return client.client_secret.read()
    except ValueError as exc:
        raise IssuerError("secret_unreadable", str(exc)) from None

    return None


def signing_alg(client: Client) -> str | None:
    """The algorithm of the client's assertions (None unless private_key_jwt)."""
    if client.auth != "private_key_jwt" or client.private_key is None:
        return None
    if client.signing_alg is not None:
        return client.signing_alg

    from broker import assertion

    try:
        return assertion.check_key(client.private_key.read().reveal(), None)
    except ValueError as exc:
        raise IssuerError("secret_unreadable", str(exc)) from None


def rotatable(client: Client) -> bool:
    """True when some credential of the client lives in a file."""
    secret = client.client_secret
    return (
        (secret is not None and secret.kind == "file")
        or client.private_key is not None
        or client.client_cert is not None
    )


def fingerprint(client: Client) -> str:
    """A short digest of the client's current credential files.

    It changes when a secret, key or certificate file is rotated, and is
    empty when there is nothing to read or the files cannot be read now.
    Only digests are kept: the values never leave this function.
    """
    sources = [
        client.client_secret,
        client.private_key,
        *(
            (client.client_cert.cert, client.client_cert.key)
            if client.client_cert
            else ()
        ),
    ]
    digest = hashlib.sha256()
    try:
        for source in sources:
            if source is not None:
                digest.update(source.read().reveal().encode())
                digest.update(b"\0")
    except ValueError:
        return ""

    return digest.hexdigest()[:16]
