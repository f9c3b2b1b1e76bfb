"""Reviewers: named people (or services) who decide approval requests, with what each
may decide, and the keys they prove who they are with.

Pure data and rules, no I/O: the store keeps reviewers and keys (`ports.store.Reviewers`),
the HTTP API and the page turn a credential into an `Identity`, and `Identity.may`
says whether it may act on a request of an agent's tool.

How a decider is known (recorded with every decision as `by_kind`):

- `reviewer`: checked by Clearance: a reviewer's key, a page session, or a trusted
  identity header the operator enabled. The instance API key is reviewer `admin`,
  granted everything.
- `app`: vouched for by the embedding code (`signal(..., by=...)` in Python).
- `claimed`: said by the sender and not checked (the CLI's `--by`, a callback-URL
  body, a broker message). Grants and groups never count a claimed name.

Keys are made and checked in `clearance.reviewer_keys` (randomness and hashing stay
out of the core); a key's stored row is a `ReviewerKey`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Final, Literal

import attrs

from clearance.core.errors import ClearanceError

ByKind = Literal["reviewer", "app", "claimed"]
REVIEWER: Final = "reviewer"
APP: Final = "app"
CLAIMED: Final = "claimed"
BY_KINDS: tuple[str, ...] = (REVIEWER, APP, CLAIMED)

DECIDE = "decide"
EXTEND = "extend"
ACTIONS = frozenset({DECIDE, EXTEND})
ADMIN = "admin"  # the reviewer the instance API key stands for

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class BadReviewer(ClearanceError, ValueError):
    """A reviewer, grant or key that cannot be stored or used; the message says why."""


def _globs(value: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    globs = tuple(item.strip() for item in items if item.strip())
    if not globs:
        raise BadReviewer("a grant names at least one agent and one tool glob, e.g. '*'")
    return globs


def _actions(value: frozenset[str] | set[str] | tuple[str, ...] | list[str]) -> frozenset[str]:
    actions = frozenset(value)
    unknown = sorted(actions - ACTIONS)
    if unknown or not actions:
        raise BadReviewer(f"grant actions are one or more of {sorted(ACTIONS)}, got {unknown}")
    return actions


@attrs.frozen
class Grant:
    """May do `actions` on the requests of any agent matching one of `agents` for any
    tool matching one of `tools` (shell-style globs: `*-account`, `process-*`)."""

    agents: tuple[str, ...] = attrs.field(converter=_globs)
    tools: tuple[str, ...] = attrs.field(converter=_globs)
    actions: frozenset[str] = attrs.field(default=frozenset({DECIDE}), converter=_actions)

    def allows(self, agent_tag: str, tool: str, action: str = DECIDE) -> bool:
        return (
            action in self.actions
            and any(fnmatch.fnmatchcase(agent_tag, glob) for glob in self.agents)
            and any(fnmatch.fnmatchcase(tool, glob) for glob in self.tools)
        )


EVERYTHING = Grant(agents=("*",), tools=("*",), actions=ACTIONS)


def valid_name(value: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise BadReviewer(
            f"a reviewer name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a"
            f" letter or digit; got {value!r}"
        )
    return value


def _grants(value: Iterable[Grant]) -> tuple[Grant, ...]:
    return tuple(value)


def _groups(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class Delegation:
    """Reviewer `to` may act with the delegating reviewer's grants until `until` (a
    holiday, an on-call handover); decisions made so say on whose behalf."""

    to: str = attrs.field(converter=valid_name)
    until: datetime
    at: datetime | None = None  # when it was given

    def active_at(self, now: datetime) -> bool:
        return now < self.until


def _delegations(value: Iterable[Delegation]) -> tuple[Delegation, ...]:
    return tuple(value)


@attrs.frozen
class Reviewer:
    name: str = attrs.field(converter=valid_name)
    grants: tuple[Grant, ...] = attrs.field(default=(), converter=_grants)
    groups: tuple[str, ...] = attrs.field(default=(), converter=_groups)
    # Others who may act with this reviewer's grants for a while.
    delegations: tuple[Delegation, ...] = attrs.field(default=(), converter=_delegations)

    def may(self, agent_tag: str, tool: str, action: str = DECIDE) -> bool:
        return any(grant.allows(agent_tag, tool, action) for grant in self.grants)

    def delegates_to(self, name: str, now: datetime) -> bool:
        return any(d.to == name and d.active_at(now) for d in self.delegations)


@attrs.frozen
class Identity:
    """Who is asking, and how that is known."""

    name: str
    kind: ByKind
    reviewer: Reviewer | None = None  # the reviewer's grants, for a `reviewer` identity
    # Reviewers whose grants were delegated to this one when it was identified.
    delegators: tuple[Reviewer, ...] = ()

    def may(self, agent_tag: str, tool: str, action: str = DECIDE) -> bool:
        """`app` identities are vouched for by the embedding code and may do anything;
        a reviewer what is granted to them or delegated to them; a claimed name nothing
        a grant guards."""
        if self.kind == APP:
            return True
        if self.kind != REVIEWER:
            return False
        if self.reviewer is not None and self.reviewer.may(agent_tag, tool, action):
            return True
        return self.acting_for(agent_tag, tool, action) is not None

    def acting_for(self, agent_tag: str, tool: str, action: str = DECIDE) -> str | None:
        """The reviewer on whose behalf this one acts here: None where its own grants
        cover it (or it is not a reviewer), else the first delegator whose grants do."""
        if self.kind != REVIEWER or (
            self.reviewer is not None and self.reviewer.may(agent_tag, tool, action)
        ):
            return None
        for delegator in self.delegators:
            if delegator.may(agent_tag, tool, action):
                return delegator.name
        return None


def admin() -> Identity:
    """The instance API key's identity."""
    return Identity(ADMIN, REVIEWER, Reviewer(ADMIN, (EVERYTHING,)))


@attrs.frozen
class ReviewerKey:
    """A stored key: its id, whose it is, and the digest of its secret (never the secret)."""

    key_id: str
    reviewer: str
    digest: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def valid_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)
