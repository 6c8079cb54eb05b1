"""``autobatch cache show|clear``: the stored probe results. Imports no torch."""

from __future__ import annotations

import argparse

from autobatch.cli.io import Streams, console

__all__ = ["run"]


def run(args: argparse.Namespace, streams: Streams) -> int:
    """List the cached probe results (a table, or ``--json``), or delete them all."""
    from rich.table import Table
    from rich.text import Text

    from autobatch.cache.store import ProbeCache
    from autobatch.cli import JSON_SCHEMA_VERSION
    from autobatch.units import format_bytes

    store = ProbeCache(args.cache_dir)
    human = console(streams.people)
    if args.action == "clear":
        removed = store.clear()
        human.print(
            f"removed {removed} cached probe result(s) from {store.directory}", highlight=False, markup=False
        )
        if args.json:
            payload = {
                "schema_version": JSON_SCHEMA_VERSION,
                "directory": str(store.directory),
                "removed": removed,
            }
            streams.write_json(payload)
        return 0
    entries = store.entries()
    if args.json:
        streams.write_json(
            {
                "schema_version": JSON_SCHEMA_VERSION,
                "directory": str(store.directory),
                "entries": [{**vars(e), "path": str(e.path)} for e in entries],
            }
        )
        return 0
    if not entries:
        human.print(
            f"No cached probe results in {store.directory}: each probe or fit stores one for the setup it "
            "probed.",
            highlight=False,
            markup=False,
        )
        return 0
    table = Table(title="autobatch probe cache", title_justify="left")
    for column in ("created (UTC)", "model", "device", "dtype", "limit", "micro", "key"):
        table.add_column(column, justify="right" if column == "micro" else "left", no_wrap=True)
    for e in entries:
        limit = format_bytes(e.memory_limit) if e.memory_limit is not None else "–"
        cells = (e.created[:16].replace("T", " "), e.model, e.device, e.precision, limit, str(e.micro_batch))
        table.add_row(*(Text(cell) for cell in (*cells, e.key[:8])))  # a file's strings, never markup
    human.print(table)
    human.print(f"{len(entries)} result(s) in {store.directory}", highlight=False, markup=False)
    return 0
