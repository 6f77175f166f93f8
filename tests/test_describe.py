"""check-config's summary: every client's settings and where secrets come from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from broker.describe import describe
from broker.loader import Loaded, load
from tests.pki import make_pki

ENV_SECRET = "env-secret-value-1"
FILE_SECRET = "file-secret-value-2"
LITERAL_SECRET = "literal-secret-value-3"
DEV_SECRET = "dev-secret-value-4"
CONFIG = f"""\
listen:
  http: 127.0.0.1:8181
  unix: /run/tb.sock
  unix_mode: "0600"
  metrics: 0.0.0.0:9464
environments:
  staging: {{token_url: "https://auth.staging.example.com/oauth2/token"}}
  production: {{token_url: "https://auth.example.com/oauth2/token"}}
clients:
  chat:
    environment: production
    client_id: m2m-chat
    client_secret: {{env: CHAT_SECRET}}
    scopes: [chat:invoke, chat:read]
    auth: client_secret_post
    audience: https://api.example.com
    resource: [https://r1.example.com, https://r2.example.com]
  files:
    environment: staging
    client_id: m2m-files
    client_secret: {{file: files-secret}}
    encoding: json
    required: false
    params: {{tenant: acme, region: eu}}
  legacy:
    environment: production
    client_id: m2m-legacy
    client_secret: {LITERAL_SECRET}
dev_issuer:
  clients:
    m2m-demo: {{secret: {DEV_SECRET}}}
"""


@pytest.fixture
def loaded(tmp_path: Path) -> Loaded:
    """A config with env, file and literal secrets and every listener."""
    (tmp_path / "files-secret").write_text(FILE_SECRET + "\n")
    (tmp_path / "broker.yaml").write_text(CONFIG)
    return load(tmp_path / "broker.yaml", {"CHAT_SECRET": ENV_SECRET})


def block(text: str, client: str) -> list[str]:
    """Return the lines describing one client."""
    lines = text.splitlines()
    start = lines.index(f"  {client}") + 1
    end = start
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    return lines[start:end]


def field(text: str, client: str, label: str) -> str:
    """Return the value shown for ``label`` in ``client``'s block."""
    for line in block(text, client):
        if line.strip().startswith(label + "  "):
            return line.strip().removeprefix(label).strip()
    raise AssertionError(f"{label} missing for {client}")


def test_no_secret_value_appears(loaded: Loaded) -> None:
    """Neither env, file, literal nor dev issuer secrets are printed."""
    text = describe(loaded)

    for secret in (ENV_SECRET, FILE_SECRET, LITERAL_SECRET, DEV_SECRET):
        assert secret not in text


def test_each_client_shows_every_field(loaded: Loaded) -> None:
    """Environment, URL, scopes, auth, encoding, required and secret source."""
    text = describe(loaded)

    assert field(text, "chat", "environment") == "production"
    assert field(text, "chat", "token URL") == "https://auth.example.com/oauth2/token"
    assert field(text, "chat", "client id") == "m2m-chat"
    assert field(text, "chat", "scopes") == "chat:invoke chat:read"
    assert field(text, "chat", "auth") == "client_secret_post"
    assert field(text, "chat", "encoding") == "form"
    assert field(text, "chat", "required") == "yes"
    assert field(text, "chat", "secret") == "env CHAT_SECRET"
    assert field(text, "chat", "audience") == "https://api.example.com"
    assert field(text, "chat", "resource") == (
        "https://r1.example.com https://r2.example.com"
    )


def test_secret_sources_and_defaults_per_client(loaded: Loaded) -> None:
    """File paths are resolved, literals flagged, missing scopes said so."""
    text = describe(loaded)
    secret_file = Path(loaded.path).parent / "files-secret"

    assert field(text, "files", "secret") == f"file {secret_file}"
    assert field(text, "files", "encoding") == "json"
    assert field(text, "files", "required") == "no"
    assert field(text, "files", "scopes") == "(none)"
    assert field(text, "files", "extra params") == "region, tenant"
    assert field(text, "legacy", "secret") == "literal in the config file"
    assert field(text, "legacy", "auth") == "client_secret_basic"


def test_extra_param_values_are_not_shown(loaded: Loaded) -> None:
    """Only the names of extra parameters are listed."""
    assert "acme" not in describe(loaded)


def test_listeners_are_listed(loaded: Loaded) -> None:
    """Token API on TCP and socket (with mode), metrics and dev issuer."""
    lines = describe(loaded).splitlines()

    assert "  token API (http)  http://127.0.0.1:8181" in lines
    assert "  token API (unix)  /run/tb.sock (mode 0600)" in lines
    assert "  metrics           http://0.0.0.0:9464" in lines
    assert "  dev issuer        http://127.0.0.1:8180" in lines


def test_listeners_turned_off_say_off(tmp_path: Path) -> None:
    """A null listener is shown as off, and no dev issuer line without one."""
    text = CONFIG.split("dev_issuer:")[0].replace(
        "  http: 127.0.0.1:8181", "  http: null"
    )
    (tmp_path / "files-secret").write_text(FILE_SECRET)
    (tmp_path / "broker.yaml").write_text(
        text.replace("  unix: /run/tb.sock", "  unix: null").replace(
            "  http: null", "  http: 127.0.0.1:8181"
        )
    )
    lines = describe(load(tmp_path / "broker.yaml", {"CHAT_SECRET": "x"})).splitlines()

    assert "  token API (unix)  off" in lines
    assert not any("dev issuer" in line for line in lines)


def test_one_warning_line_per_literal_secret(loaded: Loaded) -> None:
    """Each client with a literal secret gets one warning line; others none."""
    warnings = [
        line for line in describe(loaded).splitlines() if line.startswith("warning:")
    ]

    assert len(warnings) == 1
    assert "legacy" in warnings[0]
    assert "{env: NAME} or {file: PATH}" in warnings[0]


def test_labels_are_aligned(loaded: Loaded) -> None:
    """Values in every client block start in the same column."""
    text = describe(loaded)
    label = re.compile(r" +\S+(?: \S+)* {2,}")
    columns = set()
    for client in ("chat", "files", "legacy"):
        for line in block(text, client):
            match = label.match(line)
            assert match is not None
            columns.add(match.end())

    assert len(columns) == 1


def test_header_names_the_file_and_counts_clients(loaded: Loaded) -> None:
    """The summary starts with the file and says how many clients it has."""
    lines = describe(loaded).splitlines()

    assert lines[0] == f"config {loaded.path}"
    assert "clients (3)" in lines


def test_key_and_certificate_clients_show_their_files(tmp_path: Path) -> None:
    """private_key_jwt and mutual TLS clients show where their files are,
    and a discovered endpoint shows its issuer; no key material."""
    pki = make_pki(tmp_path)
    key = tmp_path / "client.key"
    key.write_bytes(pki.client_key_file.read_bytes())
    (tmp_path / "broker.yaml").write_text(
        f"""\
environments:
  disc: {{issuer: "https://auth.example.com"}}
clients:
  keys:
    environment: disc
    client_id: m2m-keys
    auth: private_key_jwt
    private_key: {{file: client.key}}
    signing_alg: ES256
  mtls:
    environment: disc
    client_id: m2m-mtls
    auth: tls_client_auth
    client_cert: {{cert: {pki.client_cert_file}, key: {pki.client_key_file}}}
"""
    )

    text = describe(load(tmp_path / "broker.yaml", {}))

    keys, mtls = block(text, "keys"), block(text, "mtls")
    assert "    issuer       https://auth.example.com (token URL discovered)" in keys
    assert f"    private key  file {key}" in keys
    assert "    signing alg  ES256" in keys
    assert f"    client cert  file {pki.client_cert_file}" in mtls
    assert "PRIVATE KEY" not in text
