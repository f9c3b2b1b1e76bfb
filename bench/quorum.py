"""Benchmark 11: the pause/resume cycle when a call needs a quorum of approvals.

Benchmark 1's Clearance cycle (run -> the model asks for the gated refund -> durable
pause -> approve -> the tool runs -> final answer, a fresh SQLite file per run), with
the refund tool asking three ways:

- single approval: `approvals_required=1` (benchmark 1's tool), one approval;
- 2 of 2: `Tool(..., approvals_required=2)`, two approvals by distinct people: the first
  is a vote (the request stays pending, audited as decision "vote"), the second meets
  the quorum and the tool runs, once;
- 2 of 3 with groups: `Tool(..., approvals_required=2, groups=["finance", "risk"])`
  with three reviewers registered (alice and carol in finance, bob in risk); each cycle
  casts the two votes that meet it, one from finance (alice and carol by turns) and
  bob's, so every vote's groups are counted (the engine reads the voter's reviewer
  record) and the quorum matched to them.

Every variant registers the same three reviewers and approves by name from the app
(`by="alice"`), so the only difference is the quorum. Rounds interleave the three
(FULL and NORMAL for each, the order rotating from round to round), as benchmarks 1, 5
and 9 do; each cycle is timed on its own, and so is each vote that leaves the request
pending. Before any timing, each variant's cycle runs once on an in-memory store to
check what the votes do: pending after each vote but the last, completed after it,
the audit log saying "vote" for each vote and "approved" for the last; and two finance
votes do not meet the 2-of-3 quorum (risk is still open).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import cycle
from bench.agents import (
    AGENT,
    INPUT,
    CommitCounter,
    define_refund_agent,
)
from bench.common import (
    Section,
    Sizes,
    fmt,
    load_average,
    median,
    percentile,
    ratio,
    scratch_dir,
    table,
)
from clearance import Clearance, Grant, Reviewer
from clearance.testing import ScriptedModel

REVIEWERS = (("alice", "finance"), ("bob", "risk"), ("carol", "finance"))


@dataclass(frozen=True)
class Quorum:
    """What the tool asks for, and who votes in each cycle (by turns, where several)."""

    approvals_required: int
    groups: tuple[str, ...]
    voters: tuple[tuple[str, ...], ...]

    @property
    def votes(self) -> int:
        return len(self.voters[0])


SINGLE = "single approval"
TWO = "2 of 2"
GROUPS = "2 of 3, one from finance and one from risk"
VARIANTS: dict[str, Quorum] = {
    SINGLE: Quorum(1, (), (("alice",),)),
    TWO: Quorum(2, (), (("alice", "bob"),)),
    GROUPS: Quorum(2, ("finance", "risk"), (("alice", "bob"), ("carol", "bob"))),
}


@dataclass
class Run:
    """One timed run: `count` cycles in `seconds`, each cycle's and each pending vote's
    milliseconds, and the COMMITs SQLite ran."""

    count: int
    seconds: float
    commits: int
    cycle_ms: list[float] = field(default_factory=list)
    vote_ms: list[float] = field(default_factory=list)  # votes that left it pending

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def commits_per(self) -> float:
        return self.commits / self.count


async def _prepare(app: Clearance, quorum: Quorum) -> ScriptedModel:
    """The three reviewers, and the refund agent whose tool asks for `quorum`."""
    for name, group in REVIEWERS:
        await app.save_reviewer(Reviewer(name, [Grant(agents="*", tools="*")], (group,)))
    return define_refund_agent(
        app, approvals_required=quorum.approvals_required, groups=list(quorum.groups)
    )


async def _cycle(app: Clearance, voters: Sequence[str], vote_ms: list[float] | None = None) -> str:
    """One cycle; returns its execution's id."""
    clock = time.perf_counter
    ex = await app.run(AGENT, input=INPUT)
    assert ex.status == "awaiting_approval", ex.status
    request_id = ex.pending_approvals[0].request_id
    for voter in voters[:-1]:
        began = clock()
        ex = await app.signal(ex.id, "approve", request_id=request_id, by=voter)
        if vote_ms is not None:
            vote_ms.append((clock() - began) * 1e3)
        assert ex.status == "awaiting_approval", ex.status
    ex = await app.signal(ex.id, "approve", request_id=request_id, by=voters[-1])
    assert ex.status == "completed", ex.status
    return ex.id


async def _check() -> None:
    """Each variant's cycle once, in memory: the votes do what the benchmark says."""
    for name, quorum in VARIANTS.items():
        for voters in quorum.voters:
            async with Clearance.open("memory://") as app:
                await _prepare(app, quorum)
                execution_id = await _cycle(app, voters)
                decisions = [(r.decision, r.by) for r in await app.audit(execution_id=execution_id)]
                expected = [("vote", v) for v in voters[:-1]] + [("approved", voters[-1])]
                assert decisions == expected, (name, decisions)
    async with Clearance.open("memory://") as app:  # two from finance: risk still open
        await _prepare(app, VARIANTS[GROUPS])
        ex = await app.run(AGENT, input=INPUT)
        request_id = ex.pending_approvals[0].request_id
        for voter in ("alice", "carol"):
            ex = await app.signal(ex.id, "approve", request_id=request_id, by=voter)
        assert ex.status == "awaiting_approval", ex.status
        assert ex.pending_approvals[0].still_needed() == (1, ("risk",)), ex.pending_approvals


async def _measure(path: Path, synchronous: str, n: int, quorum: Quorum) -> Run:
    async with Clearance.open(f"sqlite:///{path}", synchronous=synchronous) as app:
        model = await _prepare(app, quorum)
        counter = CommitCounter()
        app.store._db.set_trace_callback(counter)  # type: ignore[attr-defined]
        turns = quorum.voters
        for i in range(cycle.WARMUP):
            await _cycle(app, turns[i % len(turns)])
        result = Run(n, 0.0, 0)
        clock = time.perf_counter
        before = counter.commits
        start = clock()
        for i in range(n):
            began = clock()
            await _cycle(app, turns[i % len(turns)], result.vote_ms)
            result.cycle_ms.append((clock() - began) * 1e3)
        result.seconds = clock() - start
        result.commits = counter.commits - before
        model.requests.clear()
    return result


def measure(path: Path, synchronous: str, n: int, quorum: Quorum) -> Run:
    return asyncio.run(_measure(path, synchronous, n, quorum))


def run(sizes: Sizes) -> Section:
    asyncio.run(_check())
    load_before = load_average()
    began = time.perf_counter()
    runs: dict[tuple[str, str], list[Run]] = {}
    names = list(VARIANTS)
    for round_no in range(sizes.quorum_rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for synchronous in cycle.SYNCS:
            for name in order:
                with scratch_dir(f"quorum{round_no}") as where:
                    result = measure(where / "bench.db", synchronous, sizes.cycles, VARIANTS[name])
                runs.setdefault((name, synchronous), []).append(result)
    minutes = (time.perf_counter() - began) / 60

    section = Section("11. The cycle with a quorum of approvals (SQLite)")
    section.add(
        f"Benchmark 1's Clearance cycle ({sizes.cycles} cycles per variant per round, "
        f"{cycle.WARMUP} untimed warm-up cycles, a fresh WAL database each time) with the "
        "refund tool asking for one approval, for two (`approvals_required=2`), and for "
        'two from finance and risk (`approvals_required=2, groups=["finance", "risk"]`; '
        "reviewers alice and carol in finance, bob in risk, registered in every variant). "
        "Each cycle casts the votes the quorum needs, by name from the app "
        '(`signal(..., "approve", by="alice")`): a vote but the last leaves the request '
        'pending (audited as "vote"), the last runs the tool. '
        f"{sizes.quorum_rounds} round{'s' if sizes.quorum_rounds > 1 else ''} interleaving "
        "the three variants (FULL and NORMAL "
        f"for each, the order rotating by round), {minutes:.1f} min; cycles/s: median "
        "(min-max) over rounds; ms/cycle and ms per pending vote: percentiles over every "
        "cycle (vote) of every round, each timed on its own; ms per extra vote: ms/cycle "
        "from the median cycles/s, less the single approval's, per vote beyond one; 'vs "
        "single approval' compares medians (cycles/s), the per-round ratios beside it show "
        f"the noise. Load average before: {load_before}; after: {load_average()} "
        "(2 shared CPUs: other jobs may run at the same time).",
        "",
    )
    rows = []
    for synchronous in cycle.SYNCS:
        base = runs[(SINGLE, synchronous)]
        base_rate = median([r.rate for r in base])
        for name, quorum in VARIANTS.items():
            results = runs[(name, synchronous)]
            rate = median([r.rate for r in results])
            cycle_ms = [ms for r in results for ms in r.cycle_ms]
            vote_ms = [ms for r in results for ms in r.vote_ms]
            paired = [results[i].rate / base[i].rate for i in range(len(results))]
            rounds = (
                f"{ratio(median(paired))} ({min(paired):.2f}-{max(paired):.2f}x)"
                if len(paired) > 1
                else "1 round"
            )
            single = name == SINGLE
            extra = (1e3 / rate - 1e3 / base_rate) / (quorum.votes - 1) if not single else 0.0
            rows.append(
                [
                    synchronous,
                    name,
                    quorum.votes,
                    f"{fmt(rate)} ({fmt(min(r.rate for r in results))}-"
                    f"{fmt(max(r.rate for r in results))})",
                    f"{median(cycle_ms):.2f} / {percentile(cycle_ms, 95):.2f}",
                    "-" if single else f"{extra:+.2f}",
                    "-" if not vote_ms else f"{median(vote_ms):.2f}",
                    fmt(median([r.commits_per for r in results])),
                    "-" if single else ratio(rate / base_rate),
                    "-" if single else rounds,
                ]
            )
    section.add(
        *table(
            [
                "synchronous",
                "approval",
                "votes/cycle",
                "cycles/s",
                "ms/cycle p50 / p95",
                "ms per extra vote",
                "ms per pending vote p50",
                "commits/cycle",
                "vs single approval",
                "per-round ratios: median (min-max)",
            ],
            rows,
        )
    )
    return section
