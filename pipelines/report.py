"""Terminal summaries of runs and cache states."""
from __future__ import annotations

from pathlib import Path

from pipelines.stages import StageResult, StageState


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def print_results(work_dir: Path, results: list[StageResult]) -> None:
    rows = [(r.name, "ran" if r.ran else "cached", f"{r.seconds:.1f}s" if r.ran else "-", r.note, str(r.path))
            for r in results]
    print(_table(rows, ("stage", "status", "time", "why", "outputs")))
    print(f"outputs: {work_dir}")


def print_states(work_dir: Path, states: list[StageState], leftovers: list[str]) -> None:
    rows = [(s.stage.name, s.stage.group, "valid" if s.reason is None else "stale", s.reason or "cached")
            for s in states]
    print(_table(rows, ("stage", "group", "state", "why")))
    for name in leftovers:
        print(f"note: {name} was left by an interrupted run; the next run removes it")
    print(f"work folder: {work_dir}")
