"""`python -m bench --profile`: where Clearance's time goes in benchmarks 1 and 3.

Needs pyinstrument (`pip install pyinstrument`; not part of the bench extra).
Prints, for the pause/resume cycle (FULL and NORMAL) and for the `decide()`
replay, pyinstrument's call tree trimmed to frames of at least 3% and its
flat list of the functions with the most time of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bench.common import scratch_dir

HIDE = r".*/(asyncio|contextlib|selectors)/.*|.*/(asyncio|contextlib|selectors)\.py"


def _render(profiler: Any, title: str) -> str:
    from pyinstrument.renderers import ConsoleRenderer

    options = {"filter_threshold": 0.03, "hide_regex": HIDE}
    tree = profiler.output(
        ConsoleRenderer(
            unicode=False, color=False, time="percent_of_total", processor_options=options
        )
    )
    flat = profiler.output(
        ConsoleRenderer(
            unicode=False,
            color=False,
            flat=True,
            time="percent_of_total",
            processor_options={"filter_threshold": 0.015},
        )
    )
    flat_lines = [line for line in flat.splitlines() if "%" in line][:15]
    return "\n".join(
        [f"### {title}", "", "```", tree.strip(), "", "self time:", *flat_lines, "```", ""]
    )


def _profiled(title: str, work: Callable[[], Any]) -> str:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    try:
        result = work()
    finally:
        profiler.stop()
    return _render(profiler, f"{title}: {result}")


def run(cycles: int = 300) -> str:
    from bench.cycle import clearance
    from bench.step import _record_logs, _replay

    parts = ["## Profiles", ""]
    for synchronous in ("FULL", "NORMAL"):
        with scratch_dir("profile") as where:
            clearance(where / "warm.db", synchronous, 30)

            def cycle(sync: str = synchronous) -> str:
                measured = clearance(where / "bench.db", sync, cycles)
                return f"{measured.rate:.0f} cycles/s under the profiler"

            parts.append(_profiled(f"Clearance pause/resume cycle, {synchronous}", cycle))

    logs = asyncio.run(_record_logs())

    def replay() -> str:
        steps = sum(_replay(logs) for _ in range(40))
        return f"{steps} decide() steps"

    parts.append(_profiled("decide() over the replayed event mix", replay))
    return "\n".join(parts)
