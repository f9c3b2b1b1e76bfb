"""The audit log as a hash chain: any record changed, removed or inserted shows.

Each record carries the hash of the one before it. Its `entry` is the RFC 8785
canonical JSON of what it says, with the parameters, modified parameters and
reason as their own SHA-256 hashes (so `without_payload` can drop the values,
for `clearance prune`, and a pruned record's entry stays what it was); its
`hash` is SHA-256 over the previous record's hash followed by that entry. The
store keeps the entry verbatim beside the record and the chain's head (the last
hash and the number of records) in a row of its own, extended in the same
transaction as the decision it records.

Records written before the chain existed (a store upgraded in place) are covered
by the genesis hash the chain starts from: SHA-256 over their bodies, in order.

`verify` walks the stored rows in order and names the first one that does not
fit: changed (its entry or hash does not match what it says), inserted (it does
not follow the record before it, but the one after it does), or a record before
it removed or rewritten (it does not follow, and neither does the next); and
records removed from the end, which only the head shows. Whoever can rewrite every later hash and
the head can forge a consistent chain: `clearance audit export` gives the hashes
to keep elsewhere, where a rewritten head would not match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import attrs
import rfc8785

from clearance.core.commands import AuditRecord, Pruned
from clearance.core.execution import iso
from clearance.core.schema import canonical

VERSION = 1  # of what an entry holds; in every entry, so a verifier knows how to read it


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def genesis(bodies: Iterable[str]) -> str:
    """The hash the chain starts from: over the records older than it, in order."""
    digest = hashlib.sha256(b"clearance audit genesis")
    for body in bodies:
        digest.update(b"\n")
        digest.update(body.encode("utf-8"))
    return digest.hexdigest()


def _hash_of(value: Any) -> str | None:
    return None if value is None else sha256(canonical(value))


def without_payload(record: AuditRecord, at: datetime) -> AuditRecord:
    """`record` with its parameters, modified parameters and reason dropped at `at`: its
    entry, and so its link, stay exactly as they were."""
    if record.pruned is not None:
        return record
    kept = Pruned(
        at, _hash_of(record.parameters), _hash_of(record.modified_params), _hash_of(record.reason)
    )
    return attrs.evolve(record, parameters={}, modified_params=None, reason=None, pruned=kept)


def entry(record: AuditRecord) -> str:
    """What the chain holds of one record, as RFC 8785 canonical JSON."""
    if record.pruned is not None:
        hashes = record.pruned
        parameters = hashes.parameters_hash
        modified, reason = hashes.modified_params_hash, hashes.reason_hash
    else:
        parameters = _hash_of(record.parameters)
        modified, reason = _hash_of(record.modified_params), _hash_of(record.reason)
    said: dict[str, Any] = {
        "v": VERSION,
        "requestId": record.request_id,
        "executionId": record.execution_id,
        "agentTag": record.agent_tag,
        "tool": record.tool,
        "decision": record.decision,
        "at": iso(record.at),
        "by": record.by,
        "byKind": record.by_kind,
        "toolUseId": record.tool_use_id,
        "ruleId": record.rule_id,
        "policyVersion": record.policy_version,
        "parametersHash": parameters,
        "modifiedParamsHash": modified,
        "reasonHash": reason,
    }
    if record.on_behalf_of is not None:  # a field added later: only where it is set
        said["onBehalfOf"] = record.on_behalf_of
    return _canonical(said)


# RFC 8785 of an object whose keys are ASCII and whose values are strings, small
# integers and nulls is what this encoder writes: keys sorted (by UTF-16 code unit in
# RFC 8785, the same order for ASCII), no spaces, and strings escaped alike (\" \\
# \b \f \n \r \t, other controls as lowercase \u00xx, everything else as it is).
# It is about five times faster than the general serializer, which an approval pays
# once and `audit verify` once per record (tests/test_audit_chain.py holds it to
# rfc8785's output).
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _canonical(said: dict[str, Any]) -> str:
    text = _ENCODE(said)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: refused as RFC 8785 refuses it
        return rfc8785.dumps(said).decode("utf-8")
    return text


def link(previous: str, text: str) -> str:
    """A record's hash: over the previous record's hash and its own entry."""
    return sha256(previous + text)


@attrs.frozen
class Link:
    """One record's place in the chain, as a store writes it."""

    entry: str
    prev_hash: str
    hash: str


def extend(head: str, records: Sequence[AuditRecord]) -> list[Link]:
    """The links of `records`, appended in order after `head`."""
    links = []
    for record in records:
        text = entry(record)
        new = link(head, text)
        links.append(Link(text, head, new))
        head = new
    return links


@attrs.frozen
class ChainRow:
    """A stored audit row: its id, the record (None where it cannot be read), and its
    link (None for a record older than the chain)."""

    id: int
    record: AuditRecord | None
    body: str
    link: Link | None


@attrs.frozen
class Verdict:
    intact: bool
    records: int  # chained records that fit, before any problem
    head: str  # the last hash that fits
    problem: str | None = None  # the first one found, naming the record
    row: int | None = None  # the id of the row it names


class ChainWalk:
    """`verify`, one page of rows at a time (a store may hold millions): `feed` the
    rows in id order, then `finish` with the stored head."""

    def __init__(self) -> None:
        self._older = hashlib.sha256(b"clearance audit genesis")
        self._previous: str | None = None  # None: still reading records older than the chain
        self._records = 0
        self._suspect: ChainRow | None = None  # does not follow: inserted, or one removed?
        self.verdict: Verdict | None = None  # set at the first problem

    @property
    def previous(self) -> str:
        return self._previous if self._previous is not None else self._older.hexdigest()

    def feed(self, rows: Iterable[ChainRow]) -> bool:
        """False once a problem is found (the rest need not be read)."""
        for row in rows:
            if self.verdict is not None:
                return False
            self._walk(row)
        return self.verdict is None

    def _fail(self, problem: str, row: int | None) -> None:
        self.verdict = Verdict(False, self._records, self.previous, problem, row)

    def _walk(self, row: ChainRow) -> None:
        if self._suspect is not None:
            suspect, self._suspect = self._suspect, None
            where = _where(suspect)
            if row.link is not None and row.link.prev_hash == self.previous:
                self._fail(
                    f"{where} was inserted: it does not follow the record before it", suspect.id
                )
            else:
                self._fail(
                    f"the chain breaks before {where}: a record before it was removed or rewritten",
                    suspect.id,
                )
            return
        if row.link is None:
            if self._previous is not None:
                self._fail(f"{_where(row)} has no hash: it was inserted outside Clearance", row.id)
                return
            self._older.update(b"\n" + row.body.encode("utf-8"))
            return
        if self._previous is None:
            self._previous = self._older.hexdigest()
        if row.record is None or entry(row.record) != row.link.entry:
            self._fail(f"{_where(row)} was changed: it no longer says what was chained", row.id)
            return
        if link(row.link.prev_hash, row.link.entry) != row.link.hash:
            self._fail(f"{_where(row)} was changed: its hash does not match it", row.id)
            return
        if row.link.prev_hash != self._previous:
            if self._records == 0:
                self._fail(
                    f"a record older than the chain was changed, removed or inserted"
                    f" (the chain starts at {_where(row)})",
                    row.id,
                )
            else:
                self._suspect = row
            return
        self._previous = row.link.hash
        self._records += 1

    def finish(self, head: str | None, count: int | None) -> Verdict:
        if self.verdict is None and self._suspect is not None:
            self._fail(
                f"the chain breaks before {_where(self._suspect)}: a record before it was"
                " removed or rewritten",
                self._suspect.id,
            )
        if self.verdict is not None:
            return self.verdict
        if head is not None and (head != self.previous or count != self._records):
            if count is not None and count > self._records:
                missing = count - self._records
                self._fail(f"the last {missing} record(s) of the chain were removed", None)
            else:
                self._fail("the chain's head does not match its last record", None)
            assert self.verdict is not None
            return self.verdict
        return Verdict(True, self._records, self.previous)


def verify(rows: Iterable[ChainRow], head: str | None, count: int | None) -> Verdict:
    """Check every stored row (in id order) against the stored head: `head`, the last
    hash, and `count`, the chained records there should be."""
    walk = ChainWalk()
    walk.feed(rows)
    return walk.finish(head, count)


def _where(row: ChainRow) -> str:
    return f"record {row.id}{_about(row)}"


def _about(row: ChainRow) -> str:
    record = row.record
    if record is None:
        return ""
    which = record.request_id or f"call {record.tool_use_id}"
    by = f" by {record.by}" if record.by else ""
    return f" ({which}: {record.decision}{by}, {iso(record.at)})"
