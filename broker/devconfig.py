"""Settings of the embedded dev issuer (the ``dev_issuer:`` block)."""

from __future__ import annotations

import ssl

from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.fields import (
    Duration,
    HostPort,
    StrictModel,
    readable_file,
    require_loopback,
)
from broker.secret import PemFile, load_chain


class DevClient(StrictModel):
    """A client the embedded dev issuer knows (literal secrets: a dev tool).

    ``public_key`` (a PEM public key or certificate) lets it authenticate
    with private_key_jwt; a client may have a secret, a key, or both.
    """

    secret: str | None = Field(None, min_length=1, repr=False)
    public_key: str | None = None
    scopes: tuple[str, ...] = ()

    @field_validator("public_key")
    @classmethod
    def _public_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = readable_file(value, info, "the public key")
        from broker.assertion import load_public_key

        load_public_key(PemFile(path))  # raises ValueError naming the problem
        return path

    @model_validator(mode="after")
    def _can_authenticate(self) -> DevClient:
        if self.secret is None and self.public_key is None:
            raise ValueError("give the client a secret, a public_key, or both")
        return self


class DevTls(StrictModel):
    """The dev issuer's own certificate chain and key, to serve https."""

    cert: str
    key: str

    @field_validator("cert", "key")
    @classmethod
    def _readable(cls, value: str, info: ValidationInfo) -> str:
        return readable_file(value, info, "the file")

    @model_validator(mode="after")
    def _usable(self) -> DevTls:
        try:
            load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), self.cert, self.key)
        except (ssl.SSLError, OSError):
            raise ValueError(
                f"{self.cert} and {self.key} are not a certificate chain and its "
                "matching unencrypted PEM key"
            ) from None
        return self


class DevIssuer(StrictModel):
    """The embedded development issuer; loopback only."""

    listen: HostPort = HostPort(host="127.0.0.1", port=8180)
    token_lifetime: Duration = Field(3600.0, gt=0)
    audience: str = "token-broker-dev"
    tls: DevTls | None = None
    clients: dict[str, DevClient] = Field(min_length=1)

    @field_validator("listen")
    @classmethod
    def _on_loopback(cls, value: HostPort) -> HostPort | None:
        return require_loopback(value, "the dev issuer")
