"""Secrets never print; sources read, check and re-read them."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from broker.secret import (
    MASK,
    MAX_SECRET_BYTES,
    Secret,
    SecretSource,
    check_secret_text,
    source_from_env,
    source_from_file,
    source_from_literal,
    source_from_spec,
)

VALUE = "s3cr3t-Value-42"


def test_repr_and_str_are_masked() -> None:
    """repr, str and formatting show the mask, never the value."""
    secret = Secret(VALUE)

    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}"):
        assert VALUE not in shown
        assert MASK in shown


def test_reveal_returns_the_value() -> None:
    """reveal() is the one way to the clear value."""
    assert Secret(VALUE).reveal() == VALUE


def test_a_secret_in_a_container_stays_masked() -> None:
    """Secrets inside lists and dicts print masked too."""
    assert VALUE not in repr({"secret": [Secret(VALUE)]})


def test_fingerprint_is_short_stable_and_not_the_value() -> None:
    """The fingerprint tells two values apart without showing either."""
    first = Secret(VALUE).fingerprint()

    assert first == Secret(VALUE).fingerprint()
    assert first != Secret(VALUE + "x").fingerprint()
    assert len(first) == 8
    assert VALUE not in first


def test_equality_compares_values() -> None:
    """Two secrets are equal exactly when their values are."""
    assert Secret(VALUE) == Secret(VALUE)
    assert Secret(VALUE) != Secret("other")
    assert Secret(VALUE) != VALUE
    assert hash(Secret(VALUE)) == hash(Secret(VALUE))


def test_truthiness_follows_the_value() -> None:
    """An empty secret is falsy."""
    assert Secret(VALUE)
    assert not Secret("")


def test_a_secret_cannot_be_pickled() -> None:
    """Pickling would write the value somewhere unmasked."""
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Secret(VALUE))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALUE, VALUE),
        (VALUE + "\n", VALUE),
        (VALUE + "\r\n", VALUE),
        (" padded ", " padded "),
        ("ünïcödé-✓", "ünïcödé-✓"),
    ],
)
def test_one_trailing_newline_is_stripped(text: str, expected: str) -> None:
    """A final LF or CRLF is not part of the secret; other text is kept."""
    assert check_secret_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        VALUE + "\n\n",
        VALUE + "\r",
        "ab\rcd",
        "ab\x00cd",
        "ab\tcd",
        "ab\x1bcd",
        "ab\x7fcd",
        "ab\x85cd",
        "\n" + VALUE,
    ],
)
def test_other_control_characters_are_refused(text: str) -> None:
    """Control characters anywhere else are refused, and the message hides them."""
    with pytest.raises(ValueError, match="control character") as info:
        check_secret_text(text)

    assert "ab" not in str(info.value)
    assert VALUE not in str(info.value)


@pytest.mark.parametrize("text", ["", "\n", "\r\n"])
def test_an_empty_secret_is_refused(text: str) -> None:
    """Nothing left after the newline is an error."""
    with pytest.raises(ValueError, match="empty"):
        check_secret_text(text)


def test_env_source_reads_the_variable_once() -> None:
    """The env source keeps the value it read, whatever the mapping does later."""
    environ = {"CHAT_SECRET": VALUE + "\n"}
    source = source_from_env("CHAT_SECRET", environ)
    environ["CHAT_SECRET"] = "changed"

    assert source.kind == "env"
    assert source.read().reveal() == VALUE


def test_env_source_needs_the_variable() -> None:
    """A missing variable is named in the error."""
    with pytest.raises(ValueError, match="CHAT_SECRET is not set"):
        source_from_env("CHAT_SECRET", {})


def test_env_source_refuses_a_control_character_without_showing_it() -> None:
    """The check also applies to environment values."""
    with pytest.raises(ValueError, match="control character") as info:
        source_from_env("CHAT_SECRET", {"CHAT_SECRET": VALUE + "\x07"})

    assert VALUE not in str(info.value)


def test_literal_source_holds_the_checked_value() -> None:
    """A literal is checked like any other secret."""
    assert source_from_literal(VALUE + "\n").read().reveal() == VALUE
    with pytest.raises(ValueError, match="control character"):
        source_from_literal("a\x01b")


def test_file_source_reads_again_on_every_call(tmp_path: Path) -> None:
    """A rotated file takes effect at the next read, with no reload."""
    path = tmp_path / "client-secret"
    path.write_text(VALUE + "\n")
    source = source_from_file(str(path))

    assert source.read().reveal() == VALUE
    path.write_text("rotated\r\n")
    assert source.read().reveal() == "rotated"


def test_file_source_proves_the_file_readable_now(tmp_path: Path) -> None:
    """A missing file fails when the source is built, naming the path."""
    path = tmp_path / "missing"

    with pytest.raises(ValueError, match=f"cannot read {path}: No such file"):
        source_from_file(str(path))


def test_file_source_refuses_a_directory(tmp_path: Path) -> None:
    """A directory is not a secret file."""
    with pytest.raises(ValueError, match="Is a directory"):
        source_from_file(str(tmp_path))


def test_file_source_refuses_a_fifo_without_waiting(tmp_path: Path) -> None:
    """A FIFO is refused at once rather than blocking the reader."""
    path = tmp_path / "pipe"
    os.mkfifo(path)

    with pytest.raises(ValueError, match="not a regular file"):
        source_from_file(str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever the mode")
def test_file_source_reports_permission_denied(tmp_path: Path) -> None:
    """An unreadable file is reported with the OS's reason."""
    path = tmp_path / "client-secret"
    path.write_text(VALUE)
    path.chmod(0)

    with pytest.raises(ValueError, match="Permission denied"):
        source_from_file(str(path))


def test_file_source_refuses_an_oversized_file(tmp_path: Path) -> None:
    """A file far larger than any secret is refused, not read into memory."""
    path = tmp_path / "big"
    path.write_bytes(b"a" * (MAX_SECRET_BYTES + 1))

    with pytest.raises(ValueError, match="larger than"):
        source_from_file(str(path))


def test_file_source_refuses_non_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused without echoing them."""
    path = tmp_path / "client-secret"
    path.write_bytes(b"\xff\xfe secret")

    with pytest.raises(ValueError, match="not UTF-8") as info:
        source_from_file(str(path))

    assert "secret" not in str(info.value).replace(str(path), "")


def test_file_source_refuses_a_control_character_without_showing_it(
    tmp_path: Path,
) -> None:
    """Content checks apply to files, and the message hides the content."""
    path = tmp_path / "client-secret"
    path.write_text(VALUE + "\x00\n")

    with pytest.raises(ValueError, match="control character") as info:
        source_from_file(str(path))

    assert VALUE not in str(info.value)


def test_file_source_failing_later_raises_value_error(tmp_path: Path) -> None:
    """A file removed after start fails the read with ValueError."""
    path = tmp_path / "client-secret"
    path.write_text(VALUE)
    source = source_from_file(str(path))
    path.unlink()

    with pytest.raises(ValueError, match="cannot read"):
        source.read()


def test_describe_says_where_never_what(tmp_path: Path) -> None:
    """describe() names the kind and place of each source, without the value."""
    path = tmp_path / "client-secret"
    path.write_text(VALUE)

    assert source_from_env("CHAT_SECRET", {"CHAT_SECRET": VALUE}).describe() == (
        "env CHAT_SECRET"
    )
    assert source_from_file(str(path)).describe() == f"file {path}"
    assert source_from_literal(VALUE).describe() == "literal in the config file"


def test_source_repr_is_masked() -> None:
    """A source's repr shows kind and name but masks the value."""
    text = repr(source_from_env("CHAT_SECRET", {"CHAT_SECRET": VALUE}))

    assert "CHAT_SECRET" in text
    assert VALUE not in text


def test_sources_differ_when_their_values_do() -> None:
    """A changed env or literal value makes the source unequal, so reloads see it."""
    before = source_from_env("CHAT_SECRET", {"CHAT_SECRET": VALUE})
    same = source_from_env("CHAT_SECRET", {"CHAT_SECRET": VALUE})
    after = source_from_env("CHAT_SECRET", {"CHAT_SECRET": "rotated"})

    assert before == same
    assert before != after
    assert source_from_literal("a") != source_from_literal("b")
    assert SecretSource("file", "/a") == SecretSource("file", "/a")


def test_spec_builds_each_kind(tmp_path: Path) -> None:
    """A config value picks env, file (relative to base_dir) or literal."""
    (tmp_path / "chat").write_text(VALUE + "\n")
    environ = {"CHAT_SECRET": VALUE}

    assert source_from_spec({"env": "CHAT_SECRET"}, environ, "/").kind == "env"
    from_file = source_from_spec({"file": "chat"}, {}, str(tmp_path))
    assert from_file.name == str(tmp_path / "chat")
    assert from_file.read().reveal() == VALUE
    assert source_from_spec(VALUE, {}, "/").kind == "literal"


@pytest.mark.parametrize(
    "spec",
    [12345678901, 1.5, True, None, ["12345678901"], {"env": "A", "file": "B"}, {}],
)
def test_spec_of_another_shape_is_refused_unquoted(spec: object) -> None:
    """Anything else is refused with a message that does not describe it."""
    with pytest.raises(ValueError, match="expected \\{env: NAME\\}") as info:
        source_from_spec(spec, {}, "/")

    assert "12345678901" not in str(info.value)
