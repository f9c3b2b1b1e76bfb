"""Quorum: how many people, and from which groups, must approve one call.

A request asks for `approvals_required` approvals (1 unless the tool or the ask rule
that asked says more) and, optionally, one approver from each of `groups` ("one from
finance and one from risk"). Every vote is a distinct person's approval of the exact
call the request now asks about: an edit makes a new call, so it starts the count
again with the editor's vote. One person counts for one group at most, so groups are
covered by a matching of voters to groups, not by a union of everyone's groups.

Pure and small: `decide()` records votes on the request and asks `met` after each.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import attrs

# Votes and groups a request may need: a quorum is a handful of people, and a matching
# over more is not what anyone means.
MAX_APPROVALS = 10
MAX_GROUPS = 10


@attrs.frozen
class Vote:
    """One person's approval, counted towards a quorum."""

    by: str
    at: datetime
    by_kind: str  # reviewer | app: a claimed name never counts
    groups: tuple[str, ...] = ()  # the voter's groups when they voted
    on_behalf_of: str | None = None  # the reviewer whose delegated grants they used


def _matched(votes: Sequence[Vote], groups: Sequence[str]) -> dict[str, str]:
    """A largest assignment of distinct voters to `groups` (group -> voter), found by
    augmenting paths (Kuhn's algorithm; both sides have at most ten members)."""
    owner: dict[str, str] = {}  # voter -> group
    voters = {vote.by: set(vote.groups) for vote in votes}

    def place(group: str, seen: set[str]) -> bool:
        for voter, theirs in voters.items():
            if group in theirs and voter not in seen:
                seen.add(voter)
                if voter not in owner or place(owner[voter], seen):
                    owner[voter] = group
                    return True
        return False

    for group in groups:
        place(group, set())
    return {group: voter for voter, group in owner.items()}


def met(votes: Sequence[Vote], approvals_required: int, groups: Sequence[str]) -> bool:
    """Whether `votes` (distinct voters) meet the quorum."""
    if len(votes) < approvals_required:
        return False
    return len(_matched(votes, groups)) == len(groups)


def still_needed(
    votes: Sequence[Vote], approvals_required: int, groups: Sequence[str]
) -> tuple[int, tuple[str, ...]]:
    """(approvals still needed, groups nobody who voted belongs to): what a request
    shows its reviewers. The count also covers groups that one voter of several groups
    cannot stand for at once (then any of them will do)."""
    matched = _matched(votes, groups)
    open_groups = tuple(g for g in groups if not any(g in v.groups for v in votes))
    return max(approvals_required - len(votes), len(groups) - len(matched), 0), open_groups
