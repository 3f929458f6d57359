"""Arrow tables printed for people (a table that fits the terminal) or for programs (JSON, CSV).

pyarrow is imported by the functions, not here: every process of `up` imports the command line, and most of
them never print a table (~35 MB each)."""

from __future__ import annotations

import json
import sys
from datetime import date, datetime, time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


UNLIMITED_WIDTH = 10_000  # --wide: no column folded, whatever the terminal


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def json_value(value):
    """What json.dumps cannot write itself: times as ISO 8601, bytes as hex, anything else as its text."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


def flat_columns(table: pa.Table) -> pa.Table:
    """Lists, structs and maps (which CSV has no place for) as JSON text, bytes as hex, the rest as they are."""
    import pyarrow as pa

    for index, field in enumerate(table.schema):
        kind = field.type
        binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
        if binary or pa.types.is_nested(kind):
            text = json_value if binary else lambda value: json.dumps(value, default=json_value)
            texts = [None if value is None else text(value) for value in table.column(index).to_pylist()]
            table = table.set_column(index, field.name, pa.array(texts, pa.string()))
    return table


def print_table(table: pa.Table, output_format: str, title: str | None = None, wide: bool = False) -> None:
    """As JSON, CSV, or a table for people: at its natural width when it fits the terminal (or with `wide`, for a
    pager or a wide window), else a row at a time, a line per column (as psql's expanded display); without a
    title, it ends with its row count."""
    import pyarrow as pa

    if output_format == "json":
        print(json.dumps(table.to_pylist(), default=json_value, indent=2))
    elif output_format == "csv":
        import pyarrow.csv as pacsv

        if table.num_rows:
            flat = flat_columns(table)
            with pacsv.CSVWriter(sys.stdout.buffer, flat.schema) as writer:
                writer.write_table(flat)
        else:
            print(",".join(table.schema.names))
    else:
        from rich.console import Console
        from rich.table import Table

        rows = [[cell(value) for value in row.values()] for row in table.to_pylist()]
        console = Console(width=UNLIMITED_WIDTH if wide else None)
        widths = [max([len(name), *(len(row[index]) for row in rows)]) for index, name in enumerate(table.schema.names)]
        if rows and sum(widths) + 2 * (len(widths) - 1) > console.width:
            print_rows_expanded(console, table.schema.names, rows, title)
        else:
            view = Table(title=title, title_justify="left", pad_edge=False, box=None, header_style="bold")
            for name, column_type in zip(table.schema.names, table.schema.types):
                numeric = pa.types.is_integer(column_type) or pa.types.is_floating(column_type)
                view.add_column(name, justify="right" if numeric else "left", overflow="fold")
            for row in rows:
                view.add_row(*row)
            console.print(view, crop=False)
        if title is None:
            console.print(f"{table.num_rows} row{'' if table.num_rows == 1 else 's'}", style="dim")


def print_rows_expanded(console, names: list[str], rows: list[list[str]], title: str | None) -> None:
    """Each row as a block of "column  value" lines: what a table too wide for the terminal reads as."""
    if title:
        console.print(title, style="italic")
    label = max(len(name) for name in names)
    for number, row in enumerate(rows, start=1):
        console.print(f"-[ row {number} ]" + "-" * max(0, min(console.width, label + 30) - 12), style="dim")
        for name, value in zip(names, row):
            console.print(f"{name:<{label}}  {value}", highlight=False, soft_wrap=True)
