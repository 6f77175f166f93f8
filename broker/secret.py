"""Secret values that cannot print, and the places they are read from."""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import stat
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

MASK = "**********"

# A client secret is tens of bytes; a file far larger is a wrong path
# (a log, a device such as /dev/zero) that must not be read into memory.
MAX_SECRET_BYTES = 64 * 1024


class Secret:
    """A string whose ``repr`` and ``str`` never show the value.

    Only :meth:`reveal` hands the value out, so a secret that reaches a log
    line, an exception or a config dump by accident prints as a mask.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the clear value, for the one place that must send it."""
        return self._value

    def fingerprint(self) -> str:
        """Return a short, non-reversible tag to tell two values apart in logs."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def check_secret_text(text: str) -> str:
    """Strip one trailing newline (LF or CRLF); refuse other control characters.

    Files written by ``echo`` or editors end in a newline that is never part of
    the secret; any other control character is a copy-paste accident that would
    make the issuer refuse the client with no hint why. Raises ``ValueError``
    whose message never contains the text.
    """
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]

    if not text:
        raise ValueError("the secret is empty")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise ValueError("the secret contains a control character")
    if any(unicodedata.category(ch) == "Cs" for ch in text):
        # os.environ keeps undecodable bytes as lone surrogates, which cannot
        # be encoded to send (or to fingerprint) later.
        raise ValueError("the secret is not valid UTF-8 text")

    return text


@dataclass(frozen=True)
class SecretSource:
    """Where a client's secret comes from: ``env``, ``file`` or ``literal``.

    ``env`` and ``literal`` values are fixed for the process's life and held
    here; ``file`` secrets are read again for every token request, so a
    rotated file takes effect without a restart. Two sources are equal when
    they would yield the same secret, so a reload can tell a changed one.
    """

    kind: Literal["env", "file", "literal"]
    name: str = ""
    value: Secret | None = None

    def read(self) -> Secret:
        """Return the current secret; raise ``ValueError`` when unreadable."""
        if self.kind != "file":
            assert self.value is not None
            return self.value

        return Secret(check_secret_text(_read_secret_file(self.name)))

    def describe(self) -> str:
        """Say where the secret comes from, never what it is."""
        if self.kind == "literal":
            return "literal in the config file"
        return f"{self.kind} {self.name}"


def _read_secret_file(path: str) -> str:
    try:
        # O_NONBLOCK: a FIFO at the path must fail the check, not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{path} is not a regular file")
            data = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None

    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"{path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


@dataclass(frozen=True)
class PemFile:
    """A PEM file (a private key or a certificate), read anew for every use.

    Like ``file`` secrets, a rotated file takes effect without a restart. Its
    text is handed out as a :class:`Secret`, since it may hold a private key.
    """

    path: str

    def read(self) -> Secret:
        """Return the file's text; raise ``ValueError`` when unreadable."""
        text = _read_secret_file(self.path)
        if "-----BEGIN " not in text:
            raise ValueError(f"{self.path} holds no PEM block")
        return Secret(text)

    def describe(self) -> str:
        """Say where the key or certificate comes from."""
        return f"file {self.path}"


def pem_from_spec(spec: object, base_dir: str) -> PemFile:
    """Build a :class:`PemFile` from ``{file: PATH}`` and prove it readable."""
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, name),) = spec.items()
        if kind == "file" and isinstance(name, str) and name:
            pem = PemFile(os.path.join(base_dir, os.path.expanduser(name)))
            pem.read()
            return pem

    raise ValueError("expected {file: PATH} naming a PEM file")


def source_from_env(name: str, environ: Mapping[str, str]) -> SecretSource:
    """Build an ``env`` source, reading the variable once now."""
    if name not in environ:
        raise ValueError(f"environment variable {name} is not set")

    return SecretSource("env", name, Secret(check_secret_text(environ[name])))


def source_from_file(path: str) -> SecretSource:
    """Build a ``file`` source and prove the file is readable now."""
    source = SecretSource("file", path)
    source.read()

    return source


def source_from_literal(value: str) -> SecretSource:
    """Build a ``literal`` source (allowed, but warned about at start)."""
    return SecretSource("literal", "", Secret(check_secret_text(value)))


def source_from_spec(
    spec: object, environ: Mapping[str, str], base_dir: str
) -> SecretSource:
    """Build a source from a config value: ``{env: NAME}``, ``{file: PATH}`` or text.

    A relative ``PATH`` is taken from ``base_dir``. Raises ``ValueError``
    whose message never describes ``spec``: it may be the secret, mistyped.
    """
    if isinstance(spec, str):
        return source_from_literal(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, name),) = spec.items()
        if kind == "env" and isinstance(name, str) and name:
            return source_from_env(name, environ)
        if kind == "file" and isinstance(name, str) and name:
            return source_from_file(os.path.join(base_dir, os.path.expanduser(name)))

    raise ValueError(
        "expected {env: NAME}, {file: PATH} or a quoted string "
        '(write a numeric secret in quotes, such as "12345")'
    )


def load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    """Load a certificate chain and its key, never prompting for a password.

    OpenSSL asks on the terminal for the passphrase of an encrypted key,
    which would block the event loop (and swallow signals). An empty
    password makes an encrypted key fail at once instead.
    """
    context.load_cert_chain(cert, key, password=_no_password)


def _no_password() -> bytes:
    return b""
