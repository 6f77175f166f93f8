"""The README's metrics table is true: scrape a running broker against it."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests import process
from tests.test_e2e import write_config

README = Path(__file__).resolve().parent.parent / "README.md"
_ROW = re.compile(r"^\| `(token_broker_\w+)` \| (\w+) \| (.*) \|$")


def documented() -> dict[str, tuple[str, set[str]]]:
    """Each metric in the README's table: its type and its label names."""
    section = README.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, set[str]]] = {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        name, kind, labels = match.groups()
        # Label names are the backticked words outside parentheses and
        # before any ": explanation".
        bare = re.sub(r"\([^)]*\)", "", labels).split(":", 1)[0]
        table[name] = (kind, set(re.findall(r"`(\w+)`", bare)))
    return table


def family_name(name: str, kind: str) -> str:
    """How the text parser names the family of a documented sample name."""
    return name.removesuffix("_total") if kind == "counter" else name


async def test_every_documented_metric_is_exported_as_documented(
    workdir: Path,
) -> None:
    """Names, types, label names and units of the table match /metrics."""
    config = write_config(workdir, process.free_port())
    text = config.read_text().replace(
        "    auth: client_secret_post\n",
        "    auth: client_secret_post\n"
        f"    sinks: [{{path: {workdir}/models.token}}]\n"
        '    on_refresh: ["true"]\n',
    )
    config.write_text(text)
    broker = await process.start(config)
    started = broker.started()
    async with aiohttp.ClientSession() as session:
        headers = {"Token-Broker": "1"}
        base = f"http://{started['http']}/v1/tokens"
        async with session.get(f"{base}/chat?scope=chat:invoke", headers=headers):
            pass
        async with session.get(f"{base}/models", headers=headers) as answer:
            assert answer.status == 200
        await broker.wait_for_event("sink.hook_finished")
        broker.process.send_signal(signal.SIGHUP)
        await broker.wait_for_event("config.reloaded")
        async with session.get(f"http://{started['metrics']}/metrics") as scrape:
            families = {
                family.name: family
                for family in text_string_to_metric_families(await scrape.text())
            }
    assert await broker.stop() == 0

    table = documented()
    assert len(table) >= 10
    for name, (kind, labels) in table.items():
        family = families.get(family_name(name, kind))
        assert family is not None, f"{name} is documented but not exported"
        # The text format shows an info metric as a gauge named *_info.
        shown = "gauge" if kind == "info" else kind
        assert family.type == shown, f"{name}: {family.type}, documented {kind}"
        seen = {key for sample in family.samples for key in sample.labels}
        seen -= {"le"}  # histogram buckets
        assert seen == labels, f"{name}: labels {seen}, documented {labels}"
        if "duration" in name or "timestamp" in name or "skew" in name:
            assert name.endswith("_seconds"), f"{name} has no unit suffix"

    exported = {
        family
        for family in families
        if family.startswith("token_broker_") and not family.endswith("_created")
    }
    undocumented = exported - {
        family_name(name, kind) for name, (kind, _) in table.items()
    }
    assert not undocumented, f"exported but not in the README: {undocumented}"
