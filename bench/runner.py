"""The entry point: run the benchmarks, print one markdown report (and optionally save it)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import Section, Sizes, machine_lines, table

NEEDS = (
    "langgraph",
    "langgraph.checkpoint.sqlite",
    "langgraph.checkpoint.postgres",
    "aiosqlite",
    "holdpoint",
    "psycopg",
)


def missing_extras() -> list[str]:
    missing = []
    for module in NEEDS:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def _worker(kind: str, args: Sequence[str]) -> int:
    """Hidden subcommand: one measurement in a fresh process, a JSON line on stdout."""
    if kind == "scale-clearance":
        from bench.scale import clearance_level

        result: dict[str, Any] = clearance_level(*(int(a) for a in args))
    elif kind == "scale-langgraph":
        from bench.scale import langgraph_level

        result = langgraph_level(int(args[0]))
    elif kind == "pg-lanes":
        from bench.postgres import lanes_worker

        result = lanes_worker(*args)
    elif kind == "pg-pause":
        from bench.postgres_scale import builder_worker

        result = builder_worker(*args)
    elif kind == "pg-scale":
        from bench.postgres_scale import measure_worker

        result = measure_worker(*args)
    elif kind == "decider":
        from bench.latency import decider

        result = decider(args[0])
    else:
        print(f"unknown worker {kind!r}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


def report(
    sizes: Sizes,
    sections: Sequence[Section],
    seconds: float,
    machine: Sequence[str] | None = None,
    only: Sequence[int] = (),
) -> str:
    """The markdown report; `machine`: `machine_lines()` taken when the run began."""
    kind = "quick (CI smoke sizes: numbers are not meaningful)" if sizes.quick else "full"
    flags = "".join(f" --only {n}" for n in only) + (" --quick" if sizes.quick else "")
    lines = [
        "# Clearance benchmarks",
        "",
        *(machine if machine is not None else machine_lines()),
        f"- Run: `python -m bench{flags}`, {kind}, {seconds / 60:.1f} min",
        "",
    ]
    for section in sections:
        lines.append(section.markdown())
    targets = [t for s in sections for t in s.targets]
    if targets:
        lines += [
            "## Targets",
            "",
            *table(
                ["benchmark", "target", "measured", "met"],
                [[t.benchmark, t.goal, t.measured, "yes" if t.met else "**no**"] for t in targets],
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Clearance benchmarks side by side with LangGraph, holdpoint and the "
        "SQLite commit ceiling; prints a markdown report.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke, < 60 s)")
    parser.add_argument(
        "--only",
        type=int,
        action="append",
        choices=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11),
        help="run only this benchmark (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print pyinstrument profiles of the Clearance cycle and of decide() instead "
        "(needs pyinstrument)",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker[0], args.worker[1:])

    missing = missing_extras()
    if missing:
        print(
            f"the bench extra is not installed (missing: {', '.join(missing)}); "
            "run: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2

    if args.profile:
        if importlib.util.find_spec("pyinstrument") is None:
            print("--profile needs pyinstrument: pip install pyinstrument", file=sys.stderr)
            return 2
        from bench import profile

        print(profile.run(30 if args.quick else 300))
        return 0

    from bench import (
        audit,
        brokers,
        concurrent,
        cycle,
        latency,
        policy,
        postgres,
        postgres_scale,
        quorum,
        scale,
        step,
    )

    benchmarks: dict[int, Callable[[Sizes], Section]] = {
        1: cycle.run,
        2: scale.run,
        3: step.run,
        4: latency.run,
        5: concurrent.run,
        6: postgres.run,
        7: postgres_scale.run,
        8: brokers.run,
        9: policy.run,
        10: audit.run,
        11: quorum.run,
    }
    sizes = Sizes.quick_sizes() if args.quick else Sizes.full()
    chosen = sorted(set(args.only or benchmarks))
    machine = machine_lines()  # the date and the load as the run begins
    start = time.perf_counter()
    sections = []
    for number in chosen:
        began = time.perf_counter()
        print(f"benchmark {number} ...", file=sys.stderr, flush=True)
        sections.append(benchmarks[number](sizes))
        print(
            f"benchmark {number} done in {time.perf_counter() - began:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    text = report(
        sizes, sections, time.perf_counter() - start, machine, sorted(set(args.only or ()))
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0
