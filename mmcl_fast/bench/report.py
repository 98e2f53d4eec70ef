"""The terminal report of a benchmark run: one rich table per (loss, D, dtype), a row per (N, impl)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported where a table is printed: summary_table needs none of it
    from rich.console import Console
    from rich.table import Table

STATUS_STYLE = {"ok": "green", "skipped": "yellow", "oom": "red", "error": "bold red"}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _ratio(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}×" if value >= 10 else f"{value:.2f}×"


def _short(note: str | None, width: int = 60) -> str:
    if not note:
        return ""
    note = note.splitlines()[0]
    return note if len(note) <= width else note[:width - 1] + "…"


def machine_line(machine: dict) -> str:
    versions = machine.get("versions", {})
    parts = [machine.get("cpu") or "?", f"{machine.get('cores')} cores", f"{machine.get('torch_threads')} threads"]
    if machine.get("cuda") and machine.get("device", "").startswith("cuda"):
        parts.append(machine["cuda"][0]["name"])
    if machine.get("cpu_kernel_isa"):
        parts.append(f"CPU kernel {machine['cpu_kernel_isa']}")
    parts.append(f"torch {versions.get('torch')}")
    if machine.get("git_commit"):
        parts.append(f"commit {machine['git_commit'][:12]}")
    return ", ".join(parts)


def _ranks(results: dict) -> str:
    world = results.get("config", {}).get("world_size", 1)
    return f", {world} ranks (per-rank peak)" if world > 1 else ""


def tables(results: dict) -> list[Table]:
    from rich.table import Table
    machine, records = results["machine"], results["records"]
    ceiling = machine.get("matmul_gflops", {})
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["loss"], rec["d"], rec["dtype"]), []).append(rec)
    anchors = {loss: results.get("anchors", {}).get(loss, "open_clip") for loss, _, _ in groups}
    out = []
    for (loss, d, dtype), recs in groups.items():
        rate = ceiling.get(dtype)
        title = (f"{loss} fwd+bwd, D={d}, {dtype}, {machine.get('device')}{_ranks(results)}"
                 + (f" (torch matmul {rate:,.0f} GFLOP/s)" if rate else "")
                 + f" · speedup, mem. saving = {anchors[loss]} ÷ impl")
        table = Table(title=title, title_justify="left")
        for name, justify in (("N", "right"), ("impl", "left"), ("status", "left"), ("time", "right"),
                              ("speedup", "right"), ("peak MiB", "right"), ("mem. saving", "right"),
                              ("rel. err", "right"), ("GFLOP/s", "right"), ("% matmul", "right"),
                              ("note", "left")):
            table.add_column(name, justify=justify, overflow="fold", no_wrap=name != "note")
        previous_n = None
        for rec in sorted(recs, key=lambda r: (r["n"], r["impl"] != "mmcl_fast", r["impl"])):
            if previous_n is not None and rec["n"] != previous_n:
                table.add_section()
            previous_n = rec["n"]
            status = rec["status"]
            table.add_row(
                str(rec["n"]), rec["impl"], f"[{STATUS_STYLE.get(status, '')}]{status}[/]",
                _seconds(rec["seconds"]), _ratio(rec["speedup"]), _fmt(rec["peak_mib"], ",.1f"),
                _ratio(rec["memory_ratio"]), _fmt(rec["rel_err"], ".1e"), _fmt(rec["gflops"], ",.1f"),
                _fmt(None if rec["ceiling_frac"] is None else 100 * rec["ceiling_frac"], ".0f") +
                ("%" if rec["ceiling_frac"] is not None else ""),
                _short(rec["note"]))
        out.append(table)
    return out


def _cell(rec: dict | None) -> str:
    """One implementation at one N: median time / peak MiB, or why there is none."""
    if rec is None:
        return ""
    if rec["status"] == "ok":
        return f"{_seconds(rec['seconds'])} / {rec['peak_mib']:,.0f}"
    if rec.get("over_budget"):
        return "over memory budget"
    return "over time budget" if "time budget" in (rec.get("note") or "") else rec["status"]


def summary_table(records: list[dict], anchor: str) -> list[str]:
    """The markdown table of one (loss, D, dtype) group of records: per N, every implementation's median time / peak
    MiB of one forward + backward, and mmcl_fast's speedup and memory saving against the anchor. A run's summary.md
    and the generated benchmark pages of docs/ both show it."""
    impls = sorted(dict.fromkeys(r["impl"] for r in records), key=lambda impl: impl != "mmcl_fast")
    cell = {(r["impl"], r["n"]): r for r in records}
    header = ["N"] + impls + [f"mmcl_fast speedup vs {anchor}", f"memory saving vs {anchor}"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" for _ in header) + " |"]
    for n in sorted({r["n"] for r in records}):
        ours = cell.get(("mmcl_fast", n))
        row = [f"{n:,}"] + [_cell(cell.get((impl, n))) for impl in impls]
        row += [_ratio(ours and ours["speedup"]), _ratio(ours and ours["memory_ratio"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown_summary(results: dict) -> str:
    """A README-ready markdown table per (loss, D, dtype) (`summary_table`), under a line naming the machine."""
    machine = results["machine"]
    groups: dict[tuple, list[dict]] = {}
    for rec in results["records"]:
        groups.setdefault((rec["loss"], rec["d"], rec["dtype"]), []).append(rec)
    lines = [f"Machine: {machine_line(machine)}; {machine.get('date')}; memory budget "
             f"{machine.get('mem_budget_mib', 0) / 1024:.1f} GiB.", ""]
    for (loss, d, dtype), recs in groups.items():
        rate = machine.get("matmul_gflops", {}).get(dtype)
        lines.append(f"**{loss}, D={d}, {dtype}, {machine.get('device')}{_ranks(results)}** (forward+backward, "
                     f"median seconds / peak MiB{f'; torch matmul {rate:,.0f} GFLOP/s' if rate else ''})")
        lines += ["", *summary_table(recs, results.get("anchors", {}).get(loss, "open_clip")), ""]
    return "\n".join(lines)


def report_console() -> Console:
    """stdout; at least 150 columns when it is not a terminal (a file or a pipe), so rows do not wrap."""
    from rich.console import Console
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    return console


def print_report(results: dict, console: Console | None = None) -> None:
    console = console or report_console()
    for table in tables(results):
        console.print(table)
    for loss, unavailable in results["machine"].get("unavailable_impls", {}).items():
        for impl, reason in unavailable.items():
            console.print(f"[dim]{loss}: {impl} not run ({reason})[/dim]")
    console.print(f"[dim]{machine_line(results['machine'])}[/dim]")
