"""What every store adapter does with its rows once they are read, the same for all.

An adapter's own code is its SQL; these are the pieces around it that do not depend
on the database: the command a work row holds, agent specs stored once by a hash of
their canonical body, the bounded set of states a store keeps from its own commits,
and the fold of a stored snapshot and log tail back into an execution.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime

import attrs

from clearance.adapters.packed_json import compact_json, unpack
from clearance.core import audit_chain
from clearance.core.agent import AgentSpec
from clearance.core.audit_chain import ChainRow, Link
from clearance.core.commands import AuditRecord, CallModel, RunTool
from clearance.core.events import Event
from clearance.core.execution import Execution
from clearance.core.replay import OLDEST_VERSION, ReplayFailed, UnknownVersion, replay
from clearance.core.schema import canonical
from clearance.core.wire import (
    audit_from_data,
    command_from_data,
    converter,
    event_from_data,
    execution_from_data,
)
from clearance.ports.store import Forgotten, UnreadableExecution, UnreadableRecord, reading


def chain_row(
    row_id: int, body: str, entry: str | None, prev_hash: str | None, hash: str | None
) -> ChainRow:
    """A stored audit row as the chain's verifier reads it: a body that no longer reads
    as a record is kept as text (the verifier says it was changed)."""
    try:
        record: AuditRecord | None = audit_from_data(json.loads(body))
    except Exception:
        record = None
    if entry is None or prev_hash is None or hash is None:
        return ChainRow(row_id, record, body, None)
    return ChainRow(row_id, record, body, Link(entry, prev_hash, hash))


class RolledBack(Exception):
    """Raised at the end of a dry run's transaction, so that it rolls back: it counted
    what the real one would change, in the same statements."""


@attrs.frozen
class PrunedRows:
    """What `forget` does to one execution's audit rows: the new bodies (with the row
    ids) of its chained records that still hold a payload, and how many it leaves as
    they are: older than the chain (its genesis hash covers their bodies), or no longer
    readable as a record (changed outside Clearance: `verify` names them)."""

    bodies: tuple[tuple[str, int], ...]
    older: int
    unreadable: int


def forgotten(executions: Iterable[str], audits: Iterable[PrunedRows], vanished: int) -> Forgotten:
    """What a `forget` did: the executions it deleted, what it did to their audit, and
    how many it found already gone."""
    audits = list(audits)
    return Forgotten(
        tuple(executions),
        sum(len(a.bodies) for a in audits),
        sum(a.older for a in audits),
        sum(a.unreadable for a in audits),
        vanished,
    )


def prune_rows(rows: Iterable[tuple[int, str, str | None]], at: datetime) -> PrunedRows:
    """`rows`: (id, body, entry) of the audit rows of an execution being forgotten."""
    bodies: list[tuple[str, int]] = []
    older = unreadable = 0
    for row_id, body, entry in rows:
        if entry is None:
            older += 1
            continue
        try:
            record = audit_from_data(json.loads(body))
        except Exception:
            unreadable += 1
            continue
        if record.pruned is None:
            kept = audit_chain.without_payload(record, at)
            bodies.append((compact_json(converter.unstructure(kept)), row_id))
    return PrunedRows(tuple(bodies), older, unreadable)


def audit_records(rows: Iterable[tuple[int, str]]) -> list[AuditRecord]:
    """Stored (id, body) audit rows as records; one that no longer reads as a record
    raises UnreadableRecord naming it, never a parser's traceback."""
    records = []
    for row_id, body in rows:
        try:
            records.append(audit_from_data(json.loads(body)))
        except Exception as err:
            raise UnreadableRecord(
                f"audit record {row_id} cannot be read back ({type(err).__name__}: {err});"
                " it was changed outside Clearance: `clearance audit verify` names the first"
                " record changed"
            ) from err
    return records


def work_command(body: str) -> tuple[CallModel | RunTool, bool]:
    """A work row's command, and whether a stop cancelled it before it started."""
    data = json.loads(body)
    cancelled = bool(data.pop("cancelled", False))
    command = command_from_data(data)
    assert isinstance(command, CallModel | RunTool), f"not work: {command!r}"
    return command, cancelled


class Specs:
    """Agent specs by id: a hash of the canonical body, so equal specs share one row.
    The spec objects are held (by `id()`, with a strong reference), and a fold hands
    back the very object a commit used."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[AgentSpec, str, str]] = {}
        self._specs: dict[str, AgentSpec] = {}

    def row(self, spec: AgentSpec) -> tuple[str, str]:
        """The spec's id and the body to store under it."""
        known = self._rows.get(id(spec))
        if known is None:
            body = canonical(converter.unstructure(spec))
            spec_id = hashlib.sha256(body.encode()).hexdigest()[:24]
            if spec_id in self._specs and self._specs[spec_id] is not spec:
                # An equal copy (a redefinition's event read back makes one per fold):
                # not held, or every fold would add one.
                return spec_id, body
            known = (spec, spec_id, body)
            self._rows[id(spec)] = known
            self._specs[spec_id] = spec
        return known[1], known[2]

    def known(self, spec_id: str) -> AgentSpec | None:
        return self._specs.get(spec_id)

    def read(self, spec_id: str, body: str) -> AgentSpec:
        """The spec stored as `body` under `spec_id`, now known."""
        spec = converter.structure(json.loads(body), AgentSpec)
        self._specs[spec_id] = spec
        self._rows[id(spec)] = (spec, spec_id, body)
        return spec


class KeptStates:
    """States a store committed or folded, by execution id, the most recent `size`: a
    step usually loads what the step before wrote, and a paused execution still costs
    nothing in memory at scale. A store checks one against the log before using it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._states: OrderedDict[str, Execution] = OrderedDict()

    def get(self, execution_id: str) -> Execution | None:
        return self._states.get(execution_id)

    def keep(self, execution: Execution) -> None:
        self._states[execution.id] = execution
        self._states.move_to_end(execution.id)
        if len(self._states) > self.size:
            self._states.popitem(last=False)

    def drop(self, execution_id: str) -> None:
        self._states.pop(execution_id, None)

    def clear(self) -> None:
        self._states.clear()


class SpecNeeded(Exception):
    """A fold needs a spec its store has not read yet: read it, and fold again."""

    def __init__(self, spec_id: str) -> None:
        super().__init__(spec_id)
        self.spec_id = spec_id


def fold(
    execution_id: str,
    spec: AgentSpec,
    version: int | None,
    snapshot: tuple[int, bytes] | None,
    log: Iterable[tuple[int, bytes]],
    spec_of: Callable[[str], AgentSpec] | None = None,
) -> Execution:
    """The execution from its stored snapshot (seq, packed state), if any, and the log
    after it, replayed with the decide() version its first event names (None: the
    oldest). `spec` is the first event's; a snapshot names its own (by id, found with
    `spec_of`), or none if it was written before a redefinition could change it. A row
    that does not read back raises UnreadableExecution naming it."""
    state = None
    if snapshot is not None:
        since, packed = snapshot
        where = f"snapshot at event {since}"
        with reading(execution_id, where):
            data = unpack(packed)
        named = data.get("agent")
        agent = spec_of(named) if isinstance(named, str) and spec_of is not None else spec
        with reading(execution_id, where):
            data["agent"] = agent
            state = execution_from_data(data)
    events = read_events(execution_id, log)
    try:
        return replay(spec, state, [e for _, e in events], version or OLDEST_VERSION)
    except ReplayFailed as failed:
        with reading(execution_id, f"event {events[failed.index][0]}"):
            raise failed.error from None
    except UnknownVersion as newer:
        raise UnreadableExecution(f"execution {execution_id}: {newer}") from None


def read_events(execution_id: str, log: Iterable[tuple[int, bytes]]) -> list[tuple[int, Event]]:
    """The log's (seq, packed event) rows as events; one that does not read back raises
    UnreadableExecution naming it."""
    events = []
    for seq, body in log:
        with reading(execution_id, f"event {seq}"):
            events.append((seq, event_from_data(unpack(body))))
    return events
