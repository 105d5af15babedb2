"""Every number format of the rendered pages, in one place: 1,727.9 tokens/s, 2.35x, 63.6%, 16.4 ms, 4.5 MiB and
the markdown table they sit in."""

from __future__ import annotations

from typing import Any


def num(x: float, digits: int = 1) -> str:
    """1727.93 -> '1,727.9'."""
    return f"{x:,.{digits}f}"


def ratio(x: float) -> str:
    """2.349 -> '2.35x'."""
    return f"{x:.2f}x"


def pct(x: float | None) -> str:
    """0.636 -> '63.6%'; None -> '-'."""
    return "-" if x is None else f"{100 * x:.1f}%"


def mfu(row: dict[str, Any]) -> str:
    """A row's MFU against the ceiling it runs on (`mfu`; files before issue 30: `mfu_measured`, XLA's dot), never
    shown above 100%: a row above its ceiling says the ceiling was measured low."""
    x = row.get("mfu", row.get("mfu_measured"))
    return "> ceiling" if x is not None and x > 1.0 else pct(x)


def ms(seconds: float) -> str:
    """0.0164 -> '16.4'."""
    return f"{1000 * seconds:.1f}"


def mib(n: float) -> str:
    """Bytes as MiB, one decimal."""
    return f"{n / 2**20:,.1f}"


def table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table, with a blank line before and after (so it renders inside a block)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n" + "\n".join(lines) + "\n"


def shape(r: dict[str, Any]) -> str:
    """'B1 T128' or 'B8 P32+32'."""
    return f"B{r['batch']} T{r['seq']}" if r.get("prompt") is None else f"B{r['batch']} P{r['prompt']}+{r['new']}"
