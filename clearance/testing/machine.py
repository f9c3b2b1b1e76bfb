"""`AgentMachine`: a Hypothesis state machine that tests YOUR agent under Clearance.

Subclass it with your agent's `define()` arguments and run its `TestCase`::

    class RefundAgentMachine(AgentMachine):
        agent = dict(
            tag="refunds",
            tools=[Tool(tag="process-refund", ..., handler=process_refund), ...],
            human_in_loop=HumanInLoop(enabled=True, always_require_approval=["process-refund"]),
        )

        @invariant()
        def no_refund_over_limit(self) -> None:
            for call in self.calls:
                if call.tool == "process-refund":
                    assert call.params["amount"] <= 100

    TestRefunds = RefundAgentMachine.TestCase

Each example opens Clearance on a store of its own (`memory://`, or a temporary
SQLite file with `store = "file"`) with a `FakeClock`, on an event loop of its own
(closed in teardown). The model is replaced by a puppet that plays the turns the
machine drew (`strategies.model_plans`); each tool's handler is wrapped by a
recorder that calls yours (or, with `fake_handlers = True`, returns a JSON value
instead). Handlers of gated tools are also watched where other handlers could call
them directly (a name bound to them in your handlers' modules): such a call is
recorded with `direct=True`, and it fails invariant (a).

Quorums (a tool's or an ask rule's `approvals_required` above one, or `groups`): the
machine registers reviewers of its own (`reviewers = {name: [groups]}` on your
subclass, or by default two in each group any tool or rule names, one in all of them
and some in none: enough to meet the largest quorum without the requester), starts
each run as asked for by one of them or by nobody (`requested_by`), and decides as
them. An approval short of the quorum is a vote (the request stays pending); the
approval of the requester, of someone who already voted for the call, of a claimed
name or of nobody must be refused and change nothing; an edit is a new call whose
count starts with the editor; any rejection rejects. Agents without a quorum are
decided by `reviewer` as before.

Rules: start an execution with a drawn plan of model turns; decide a pending request
(approve as is, approve with modified parameters valid or invalid, reject with a
reason; where quorums are asked for, by a drawn person); vote (quorums only: a few
reviewers approve one after another, the first perhaps with changes); decide a
request a second time; stop an execution; move the clock without a sweep (so a
decision comes late); let time pass (move the clock and fire due timers). At its
deadline a request times out, unless its tool says `timeout_action="approve"` and
the call needs one person: then it is approved by nobody and runs. After every
step these must hold (each an `@invariant` below):

(a) `gated_calls_were_approved`: no handler of a gated tool ran without an approval
    of that exact request, and it got exactly the approved parameters (the model's,
    defaults filled, with the reviewers' modifications merged); with a quorum, the
    approvals the machine saw taken for exactly that call (since its last edit) are
    of as many distinct people as it needs, never the requester nor an unknown name,
    and cover its groups (checked by brute force over the machine's own record of
    who is in which group, not by Clearance's matching); nothing called one directly.
(b) `approved_calls_ran_once`: each approved request's handler ran exactly once;
    each valid ungated tool_use ran once, at once: no ungated tool ever waited for
    approval, and no request was opened for parameters the tool refuses; a request
    shows the quorum its call needs, its requester and the votes counted so far.
(c) `every_tool_use_answered_once`: every tool_use the model sent is answered by
    exactly one tool_result in the next model call (rejected, timed-out, invalid
    and unknown calls with the right error), or the execution ended.
(d) `every_decision_audited_once`: the audit log is append-only and holds one record
    per decision the machine made (or a timeout), saying what was decided, after one
    `vote` record per vote short of a quorum (by whom, the changes of a vote that
    starts a count); a timeout is audited as `timed_out`, by nobody, never as a
    person's rejection; an approval by timeout as `approved_by_timeout`, by nobody.
(e) `no_execution_left_stuck`: every execution rests: awaiting approval with a
    pending request, or finished with none.
(f) `replay_reproduces_state`: folding each execution's stored events through
    `decide()` gives its stored state, which is the state the last call returned.

Add your own with `@invariant()` methods; read `self.calls` (every handler call:
tool, params, request_id, ...), `self.executions` (id -> Execution, as stored after
the step), `self.audit`, `self.decided` (what the machine decided, per request id),
`self.ballots` (every approval Clearance took, per request id: who, of which call),
`self.requested_by` (per execution id), `self.members` (reviewer -> groups) and
`self.app` (`self.run(coroutine)` runs one on the machine's loop).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import inspect
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from itertools import permutations
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from clearance.adapters.clock import FakeClock
from clearance.adapters.ids import SequentialIds
from clearance.app import Clearance
from clearance.core.agent import APPROVE, AgentSpec, ToolSpec
from clearance.core.commands import AuditRecord
from clearance.core.errors import ClearanceError, RefusalCode
from clearance.core.execution import (
    APPROVALS,
    APPROVED,
    APPROVED_BY_TIMEOUT,
    APPROVED_MODIFIED,
    AWAITING_APPROVAL,
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    REJECTED,
    RESTING,
    TERMINAL,
    TIMED_OUT,
    VOTE,
    ApprovalRequest,
    Execution,
)
from clearance.core.policy import ALLOW, ASK, DENY, Verdict, evaluate
from clearance.core.replay import replay
from clearance.core.reviewers import APP, CLAIMED, REVIEWER, Grant, Identity, Reviewer
from clearance.definition import Tool
from clearance.ports.model import ModelReply, ModelRequest
from clearance.ports.tools import Handler, ToolContext
from clearance.testing.strategies import (
    Approve,
    Block,
    Decision,
    Plan,
    Reject,
    Turn,
    acceptable_params,
    agent_spec,
    clock_moves,
    decisions,
    is_json,
    model_plans,
    modification_problem,
    modifications,
    reasons,
    same_json,
    with_defaults,
)

T = TypeVar("T")

# How a proposed call is authorised (`AgentMachine._effect`).
GATED, UNGATED, ALLOWED, DENIED = "gated", "ungated", "allowed", "denied"


def _gating(spec: ToolSpec | None) -> str:
    """A call's authorisation by its tool's definition alone (no policy rule matched)."""
    return GATED if spec is not None and spec.gated else UNGATED


def _quorums(spec: AgentSpec) -> tuple[int, tuple[str, ...]] | None:
    """The most approvals any tool or ask rule of the agent asks for, and every group
    they name; None where each call needs one approval from anybody."""
    asked = [(t.approvals_required, t.groups) for t in spec.tools]
    if spec.policy is not None:
        rules = [r for r in spec.policy.rules if r.effect == ASK]
        asked += [(r.approvals_required or 1, r.groups) for r in rules]
    if all(a == (1, ()) for a in asked):
        return None
    return max(n for n, _ in asked), tuple(sorted({g for _, groups in asked for g in groups}))


def _covered(
    voters: Sequence[str | None], groups: Sequence[str], member: Mapping[str, Sequence[str]]
) -> bool:
    """Brute force, apart from core.quorum's matching: some choice of distinct voters,
    one per group, each in their group."""
    people = sorted({v for v in voters if v is not None})
    return any(
        all(g in member.get(v, ()) for v, g in zip(chosen, groups, strict=True))
        for chosen in permutations(people, len(groups))
    )


# What a second decision's refusal says about the one that stands.
STANDING = {
    APPROVED: "already approved",
    REJECTED: "already rejected",
    TIMED_OUT: "already timed out",
    CANCELLED: "already cancelled",
}
# Which handler call is running (the engine's call of a wrapped handler), so a direct
# call of a gated tool's function can say where it came from.
_RUNNING: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "clearance_harness_running", default=None
)


@attrs.frozen
class HandlerCall:
    """One call of a tool's handler. `direct`: the user's code called a gated tool's
    function itself (from inside the handler of `via`), not through Clearance."""

    tool: str
    params: dict[str, Any]
    request_id: str | None
    execution_id: str | None
    tool_use_id: str | None
    turn: int | None = None  # the model turn whose tool_use this call answers
    idempotency_key: str | None = None
    direct: bool = False
    via: str | None = None


@attrs.frozen
class Decided:
    """What happened to a request, as the machine made (or saw) it happen. `by_timeout`:
    approved by nobody, because it went unanswered and its tool says so
    (`timeout_action="approve"`)."""

    status: str
    by: str | None = None
    modified: Any = None
    reason: str | None = None
    by_timeout: bool = False


@attrs.frozen
class Voter:
    """Who decides a request of an agent with a quorum: one of the machine's reviewers
    (known by their identity), or someone Clearance must never count: a `claimed`
    name, or nobody (`name=None`)."""

    name: str | None
    kind: str | None = REVIEWER


@attrs.frozen
class Ballot:
    """An approval Clearance took: who, how known, the call as it left it (the
    request's parameters with every accepted change merged in), and every change
    accepted so far, as sent (what Clearance records as `modified_params`)."""

    by: str | None
    kind: str | None
    params: dict[str, Any]
    modified: dict[str, Any] | None = None


class Puppet:
    """The model: plays each execution's drawn plan (keyed by the execution's input),
    one turn per call, and answers in text once the plan runs out. Every request is
    kept in `requests`, every reply given in `replies[(execution_id, turn)]`, and the
    last turn replied per execution in `latest`.

    A tool_use block without an id gets one: unique in the execution (`ids="unique"`,
    as the Anthropic API does), or unique in its turn only (`ids="per_turn"`:
    `toolu_00`, `toolu_01`, ... each turn, as some OpenAI-compatible servers do)."""

    def __init__(self, ids: str = "unique") -> None:
        if ids not in ("unique", "per_turn"):
            raise ValueError(f"tool_use_ids must be 'unique' or 'per_turn', got {ids!r}")
        self.ids = ids
        self.plans: dict[str, Plan] = {}
        self.requests: list[ModelRequest] = []
        self.replies: dict[tuple[str, int], Turn] = {}
        self.latest: dict[str, int] = {}

    async def reply(self, request: ModelRequest) -> ModelReply:
        self.requests.append(request)
        plan = self.plans.get(request.messages[0]["content"], [])
        index = sum(1 for m in request.messages if m["role"] == "assistant")
        turn = plan[index] if index < len(plan) else [{"type": "text", "text": "Done."}]
        content = []
        for i, block in enumerate(turn):
            block = dict(block)
            if block.get("type") == "tool_use" and "id" not in block:
                per_turn = self.ids == "per_turn"
                block["id"] = f"toolu_{i:02d}" if per_turn else f"toolu_{index + 1:02d}_{i:02d}"
            content.append(block)
        self.replies[(request.execution_id, request.turn)] = content
        self.latest[request.execution_id] = request.turn
        uses = any(b.get("type") == "tool_use" for b in content)
        return ModelReply(content=content, stop_reason="tool_use" if uses else "end_turn")


def _stored(turn: Turn) -> Turn:
    """A reply as Clearance keeps it: a tool_use input JSON cannot carry becomes {}."""
    return [
        {**b, "input": {}}
        if b.get("type") == "tool_use" and "input" in b and not is_json(b["input"])
        else b
        for b in turn
    ]


def _uses(turn: Turn) -> list[Block]:
    return [b for b in turn if b.get("type") == "tool_use"]


def _twinned(turn: Turn) -> bool:
    ids = [str(b.get("id", "")) for b in _uses(turn)]
    return len(set(ids)) != len(ids)


# Examples per machine test, when the pytest plugin's --clearance-examples gives it:
# read as each machine class is made (its test module imported), after pytest's
# options are known.
EXAMPLES: int | None = None


class AgentMachine(RuleBasedStateMachine):
    """Property-based tests of one agent definition: subclass with `agent = dict(...)`,
    the keyword arguments of `Clearance.define()` (`model` is replaced by the puppet)."""

    agent: ClassVar[Mapping[str, Any]] = {}
    # Record calls without running your handlers: each returns {"ok": true, ...}.
    fake_handlers: ClassVar[bool] = False
    store: ClassVar[str] = "memory"  # "memory" (memory://) or "file" (a temporary SQLite file)
    max_turns: ClassVar[int] = 3  # tool-calling turns per execution's plan
    max_executions: ClassVar[int] = 4  # executions started per example
    watch_direct_calls: ClassVar[bool] = True
    tool_use_ids: ClassVar[str] = "unique"  # or "per_turn": see Puppet
    reviewer: ClassVar[str] = "harness-reviewer"  # `by` of decisions where no quorum is asked
    # Where a tool or ask rule asks for a quorum: the reviewers the machine registers
    # (name -> groups) and decides as. None: made from the agent (`quorum_reviewers`).
    reviewers: ClassVar[Mapping[str, Sequence[str]] | None] = None
    _compiled: ClassVar[AgentSpec | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The rules whose strategies come from the agent's tools, made per subclass."""
        super().__init_subclass__(**kwargs)
        plans = st.deferred(lambda: model_plans(cls.agent_spec().tools, max_turns=cls.max_turns))
        first = st.deferred(
            lambda: model_plans(cls.agent_spec().tools, max_turns=cls.max_turns, gated_first=True)
        )
        moves = st.deferred(lambda: clock_moves(cls.agent_spec().tools, cls.agent_spec().policy))

        def start_first(self: AgentMachine, plan: Plan) -> None:
            self._start(plan)

        def start(self: AgentMachine, plan: Plan) -> None:
            self._start(plan)

        def start_first_by(self: AgentMachine, plan: Plan, requested_by: str | None) -> None:
            self._start(plan, requested_by)

        def start_by(self: AgentMachine, plan: Plan, requested_by: str | None) -> None:
            self._start(plan, requested_by)

        def vote(self: AgentMachine, data: st.DataObject) -> None:
            self._vote(data)

        def let_time_pass(self: AgentMachine, milliseconds: int) -> None:
            self._let_time_pass(milliseconds)

        def advance_clock(self: AgentMachine, milliseconds: int) -> None:
            self._advance_clock(milliseconds)

        room = precondition(lambda self: len(self.exec_ids) < self.max_executions)
        if cls._asks_for_quorums():
            # Each run is asked for by one of the reviewers (who may then not approve it)
            # or by nobody. Agents without a quorum keep the rules (and draws) they had.
            who = st.deferred(lambda: st.sampled_from([None, *cls.quorum_reviewers()]))
            first_rule = initialize(plan=first, requested_by=who)(start_first_by)
            setattr(cls, "start_first", first_rule)  # noqa: B010
            setattr(cls, "start", room(rule(plan=plans, requested_by=who)(start_by)))  # noqa: B010
            # A quorum is met only by several approvals in a row: a rule of its own for
            # them, or rejections, stops and timeouts would end nearly every request first.
            voting = precondition(lambda self: self.quorums and self.pending_requests())
            setattr(cls, "vote", voting(rule(data=st.data())(vote)))  # noqa: B010
        else:
            setattr(cls, "start_first", initialize(plan=first)(start_first))  # noqa: B010
            setattr(cls, "start", room(rule(plan=plans)(start)))  # noqa: B010
        setattr(cls, "let_time_pass", rule(milliseconds=moves)(let_time_pass))  # noqa: B010
        setattr(cls, "advance_clock", rule(milliseconds=moves)(advance_clock))  # noqa: B010
        # Hypothesis's explain phase replays a failing state machine step by step and takes
        # minutes here; the shrunk steps say enough. `@settings(...)` on the class, or
        # assigning `TestCase.settings`, replaces this.
        test_case = cls.TestCase
        phases = [p for p in test_case.settings.phases if p is not Phase.explain]
        test_case.settings = settings(test_case.settings, phases=phases)
        if EXAMPLES is not None:  # pytest --clearance-examples N
            test_case.settings = settings(test_case.settings, max_examples=EXAMPLES)

    @classmethod
    def agent_spec(cls) -> AgentSpec:
        """The compiled agent: which tools are gated, each one's JSON Schema."""
        cached = cls.__dict__.get("_compiled")  # this class's own, not a base class's
        if isinstance(cached, AgentSpec):
            return cached
        if not cls.agent or "tag" not in cls.agent:
            raise TypeError(
                f"{cls.__name__}.agent must be the keyword arguments of Clearance.define(), "
                "e.g. dict(tag='refunds', tools=[...], human_in_loop=HumanInLoop(enabled=True))"
            )
        spec = agent_spec(**cls.agent)
        cls._compiled = spec
        return spec

    @classmethod
    def _asks_for_quorums(cls) -> bool:
        try:
            spec = cls.agent_spec()
        except Exception:
            # A base class without an agent, or one define() refuses: every example of
            # it fails with that message; which rules it gets does not matter.
            return False
        return _quorums(spec) is not None

    @classmethod
    def quorum_reviewers(cls) -> dict[str, tuple[str, ...]]:
        """The reviewers (name -> groups) the machine registers and decides as, where the
        agent asks for a quorum: `reviewers` if a subclass sets it, else two in each group
        any tool or ask rule names (one may have asked for the run), one in all of them
        (who still stands for one), and some in none, enough to meet the largest quorum
        without the requester."""
        if cls.reviewers is not None:
            return {name: tuple(groups) for name, groups in cls.reviewers.items()}
        most, groups = _quorums(cls.agent_spec()) or (1, ())
        people = [(g,) for g in groups] * 2 + ([groups] if groups else []) + [()]
        people += [()] * (most + 1 - len(people))
        return {f"reviewer-{i}": member for i, member in enumerate(people, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.spec = self.agent_spec()
        self.tag = self.spec.tag
        self.calls: list[HandlerCall] = []
        self.decided: dict[str, Decided] = {}
        self.exec_ids: list[str] = []
        self.executions: dict[str, Execution] = {}
        self.audit: list[AuditRecord] = []
        self.returned: dict[str, Execution] = {}  # the state each call last returned
        self.puppet = Puppet(self.tool_use_ids)
        self.request_turns: dict[str, int] = {}  # request id -> the model turn it is of
        # Quorums: whether any are asked for; each reviewer's groups and identity; who
        # asked for each run; every approval Clearance took, per request.
        self.quorums = _quorums(self.spec) is not None
        self.members: dict[str, tuple[str, ...]] = {}
        self.identities: dict[str, Identity] = {}
        self.voters: list[Voter] = []
        self.requested_by: dict[str, str | None] = {}
        self.ballots: dict[str, list[Ballot]] = {}
        self.clock = FakeClock()
        self._checked_requests = 0
        self._replayed: dict[str, int] = {}
        self._patched: list[tuple[dict[str, Any], str, Any, Any]] = []
        self._dir: str | None = None
        self.loop = asyncio.new_event_loop()
        try:
            url = "memory://"
            if self.store == "file":
                self._dir = tempfile.mkdtemp(prefix="clearance-harness-")
                url = f"sqlite:///{Path(self._dir) / 'harness.db'}"
            elif self.store != "memory":
                raise ValueError(f"store must be 'memory' or 'file', got {self.store!r}")
            # One unit of work at a time: which request gets which id must not depend on
            # the timing of tasks, or Hypothesis could not replay an example it found.
            self.app = Clearance.open(
                url, clock=self.clock, ids=SequentialIds(), synchronous="NORMAL", max_concurrency=1
            )
            tools = [self._recorded(tool) for tool in self.agent.get("tools", ())]
            self.app.define(**{**self.agent, "model": self.puppet, "tools": tools})
            if self.watch_direct_calls:
                self._watch_direct_calls()
            if self.quorums:
                self._register_reviewers()
        except BaseException:
            self._cleanup()
            raise

    # -- plumbing ---------------------------------------------------------------------------

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine (e.g. `self.app.pending()`) on the machine's event loop."""
        return self.loop.run_until_complete(work)

    def teardown(self) -> None:
        try:
            self.run(self.app.close())
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        for namespace, name, original, wrapper in reversed(self._patched):
            if namespace.get(name) is wrapper:
                namespace[name] = original
        self._patched.clear()
        if not self.loop.is_closed():
            self.loop.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _register_reviewers(self) -> None:
        self.members = self.quorum_reviewers()
        may_decide = [Grant(agents="*", tools="*")]
        for name, groups in self.members.items():
            self.run(self.app.save_reviewer(Reviewer(name, may_decide, groups)))
            identity = self.run(self.app.reviewer_identity(name))
            assert identity is not None, f"reviewer {name} was not registered"
            self.identities[name] = identity
        first = next(iter(self.members))
        # Besides the reviewers: a reviewer's name merely claimed (a callback body, the
        # CLI's --by) and nobody at all; neither may count towards a quorum.
        self.voters = [Voter(name) for name in self.members]
        self.voters += [Voter(first, CLAIMED), Voter(None, None)]

    def _recorded(self, tool: Any) -> Any:
        if not isinstance(tool, Tool) or tool.handler is None:
            return tool  # define() says what is wrong with it
        handler: Handler = tool.handler
        calls, tag, latest = self.calls, tool.tag, self.puppet.latest
        fake = self.fake_handlers

        def note_call(ctx: ToolContext, params: dict[str, Any]) -> None:
            # A tool runs for the turn the model last replied: the next model call
            # waits for every tool of the turn.
            calls.append(
                HandlerCall(
                    tag,
                    _copy(params),
                    ctx.request_id,
                    ctx.execution_id,
                    ctx.tool_use_id,
                    latest.get(ctx.execution_id),
                    ctx.idempotency_key,
                )
            )

        if fake or inspect.iscoroutinefunction(handler):

            async def recorded_async(ctx: ToolContext, params: dict[str, Any]) -> Any:
                note_call(ctx, params)
                if fake:
                    return {"ok": True, "tool": tag, "params": params}
                token = _RUNNING.set(tag)
                try:
                    return await handler(ctx, params)
                finally:
                    _RUNNING.reset(token)

            return attrs.evolve(tool, handler=recorded_async)

        def recorded(ctx: ToolContext, params: dict[str, Any]) -> Any:
            note_call(ctx, params)
            token = _RUNNING.set(tag)
            try:
                return handler(ctx, params)
            finally:
                _RUNNING.reset(token)

        return attrs.evolve(tool, handler=recorded)

    def _watch_direct_calls(self) -> None:
        """Rebind, in the modules of the agent's handlers, each name bound to a gated
        tool's handler to a wrapper that records the call as direct, for this example."""
        gated = {t.tag for t in self.spec.tools if t.gated}
        handlers = [t.handler for t in self.agent.get("tools", ()) if isinstance(t, Tool)]
        watched = {
            id(_function(t.handler)): (t.tag, t.handler)
            for t in self.agent.get("tools", ())
            if isinstance(t, Tool) and t.tag in gated and t.handler is not None
        }
        for handler in handlers:
            namespace = getattr(_function(handler), "__globals__", None)
            if not isinstance(namespace, dict):
                continue
            for name, value in list(namespace.items()):
                found = watched.get(id(_function(value))) if callable(value) else None
                if found is None or _function(value) is not _function(found[1]):
                    continue
                wrapper = self._direct_watch(found[0], value)
                namespace[name] = wrapper
                self._patched.append((namespace, name, value, wrapper))

    def _direct_watch(self, tag: str, function: Callable[..., Any]) -> Callable[..., Any]:
        calls = self.calls

        def note_direct(args: tuple[Any, ...]) -> None:
            ctx = args[0] if args else None
            params = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
            calls.append(
                HandlerCall(
                    tag,
                    _copy(params),
                    getattr(ctx, "request_id", None),
                    getattr(ctx, "execution_id", None),
                    getattr(ctx, "tool_use_id", None),
                    direct=True,
                    via=_RUNNING.get(),
                )
            )

        if inspect.iscoroutinefunction(function):

            async def watched_async(*args: Any, **kwargs: Any) -> Any:
                note_direct(args)
                return await function(*args, **kwargs)

            return watched_async

        def watched(*args: Any, **kwargs: Any) -> Any:
            note_direct(args)
            return function(*args, **kwargs)

        return watched

    def _observe(self) -> None:
        """Read back what the step left: every execution and the audit log."""
        self.executions = {}
        for execution_id in self.exec_ids:
            ex = self.run(self.app.store.load(execution_id))
            assert ex is not None, f"execution {execution_id} is gone from the store"
            self.executions[execution_id] = ex
            for request in ex.requests:
                if request.request_id not in self.request_turns:
                    # Opened in this step: nothing decides a request in the step that
                    # opens it, so the execution is still on the request's turn.
                    assert request.status == PENDING, f"{request.request_id} never pended"
                    self.request_turns[request.request_id] = ex.model_turn
        self.audit = self.run(self.app.audit())

    def _fingerprint(self) -> tuple[tuple[int, ...], int, int]:
        seqs = []
        for execution_id in self.exec_ids:
            ex = self.run(self.app.store.load(execution_id))
            seqs.append(ex.seq if ex is not None else -1)
        return tuple(seqs), len(self.run(self.app.audit())), len(self.calls)

    def _refused(
        self, work: Coroutine[Any, Any, Any], why: str, *words: str, code: str | None = None
    ) -> None:
        """`work` must raise ClearanceError (naming `words`, with `code` if given) and
        change nothing."""
        before = self._fingerprint()
        try:
            self.run(work)
        except ClearanceError as err:
            if code is not None:
                got = getattr(err, "code", None)
                assert got == code, f"{why}: refused as {got}, not {code}: {err}"
            for word in words:
                assert word in str(err), f"{why}: the refusal does not say {word!r}: {err}"
            after = self._fingerprint()
            assert after == before, f"{why}: refused ({err}), but something changed"
            return
        raise AssertionError(f"Clearance accepted {why}")

    def _returned(self, ex: Execution) -> None:
        self.returned[ex.id] = ex

    def pending_requests(self) -> list[ApprovalRequest]:
        """Every pending request, in the order the executions and their requests came."""
        return [r for eid in self.exec_ids for r in self.executions[eid].pending_approvals]

    def request(self, request_id: str) -> ApprovalRequest:
        for ex in self.executions.values():
            found = ex.request(request_id)
            if found is not None:
                return found
        raise AssertionError(f"no request {request_id}")

    def tool(self, tag: str) -> ToolSpec:
        spec = self.spec.tool(tag)
        assert spec is not None, f"no tool {tag}"
        return spec

    def approved(self, call: HandlerCall) -> bool:
        """Whether `call` ran for a request the machine approved (for your invariants)."""
        decided = self.decided.get(call.request_id or "")
        return not call.direct and decided is not None and decided.status == APPROVED

    def _needs(self, tool: str, params: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
        """(approvals, groups) the definition asks for this exact call: an ask rule's
        quorum where it names one, else the tool's; one approval where a rule allows it
        (an edit may move a call there)."""
        if not self.quorums:
            return 1, ()
        spec = self.tool(tool)
        needed, groups = spec.approvals_required, spec.groups
        verdict = self._verdict(tool, params)
        if verdict is not None and verdict.applied == ALLOW:
            return 1, ()
        if verdict is not None and verdict.applied == ASK:
            needed = verdict.approvals_required or needed
            groups = verdict.groups or groups
        return needed, tuple(groups)

    def _counted(self, request_id: str) -> list[Ballot]:
        """The approvals that count for the call a request asks about now: those since
        the last change of its parameters (an edit is a new call; its editor's comes
        first)."""
        ballots = self.ballots.get(request_id, [])
        run: list[Ballot] = []
        for ballot in reversed(ballots):
            if ballot.params != ballots[-1].params:
                break
            run.insert(0, ballot)
        return run

    def _current(self, request: ApprovalRequest) -> dict[str, Any]:
        """The call a request asks about now, by the machine's record of approvals."""
        ballots = self.ballots.get(request.request_id)
        return ballots[-1].params if ballots else request.parameters

    def _votes(self, request_id: str) -> list[Ballot]:
        """The approvals audited as votes: all but the one that met the quorum."""
        ballots = self.ballots.get(request_id, [])
        decided = self.decided.get(request_id)
        if decided is None or decided.status != APPROVED or decided.by_timeout:
            return ballots
        return ballots[:-1]

    # -- rules ------------------------------------------------------------------------------

    def _start(self, plan: Plan, requested_by: str | None = None) -> None:
        key = f"harness input {len(self.puppet.plans) + 1}"
        self.puppet.plans[key] = plan
        ex = self.run(self.app.run(self.tag, input=key, requested_by=requested_by))
        assert ex.id not in self.exec_ids, f"execution id {ex.id} given twice"
        self.exec_ids.append(ex.id)
        self.requested_by[ex.id] = requested_by
        self._returned(ex)
        event(f"start: {ex.status}")
        self._observe()

    @precondition(lambda self: self.pending_requests())
    @rule(data=st.data())
    def decide(self, data: st.DataObject) -> None:
        """A person decides a pending request: approve (as is, with changes the tool takes
        or with changes it must refuse) or reject. Where the agent asks for quorums, the
        person is drawn: one of the reviewers (perhaps one who voted already, or who
        asked for the run), or, for a request that needs a quorum, a claimed name or
        nobody."""
        ids = [r.request_id for r in self.pending_requests()]
        request = self.request(data.draw(st.sampled_from(ids), label="request"))
        current = self._current(request)
        voter = None
        if self.quorums:
            quorum = self._needs(request.tool, current) != (1, ())
            voters = self.voters if quorum else [v for v in self.voters if v.kind == REVIEWER]
            # Who voted already and who asked for the run are drawn more often: Clearance
            # must refuse their approvals.
            requester = self.requested_by[request.execution_id]
            again = [b.by for b in self._counted(request.request_id)] + [requester]
            voters = [Voter(name) for name in again if name is not None] + voters
            voter = data.draw(st.sampled_from(voters), label="by")
        choice = data.draw(decisions(self.tool(request.tool), current), label="decision")
        self._decide(request, choice, voter)
        self._observe()

    def _vote(self, data: st.DataObject) -> None:
        """(Where the agent asks for quorums.) Up to one more reviewer than the request
        needs approve it one after another (perhaps one who voted before, or the
        requester, whom Clearance must refuse); the first may change the parameters (a
        new call: the count starts again with them), and tries again at the end."""
        ids = [r.request_id for r in self.pending_requests()]
        request = self.request(data.draw(st.sampled_from(ids), label="request"))
        rid, current = request.request_id, self._current(request)
        needed, _ = self._needs(request.tool, current)
        people = st.sampled_from(list(self.members))
        names = data.draw(
            st.lists(people, min_size=1, max_size=needed + 1, unique=True), label="by"
        )
        changes = modifications(self.tool(request.tool).input_schema, current).map(Approve)
        # Mostly as it stands: an edit starts the count again, so a few go a long way.
        choice = data.draw(st.one_of([st.just(Approve())] * 3 + [changes]), label="decision")
        # And the first of them once more, where the request is still pending: one
        # person, one vote.
        for name in [*names, names[0]]:
            self._decide(request, choice, Voter(name))
            self._observe()
            # Decided (or, were Clearance wrong, decided otherwise than the machine
            # expects: the invariants say so after this step): nobody else votes.
            if self.request(rid).status != PENDING:
                break
            choice = Approve()

    def _signal(
        self, request: ApprovalRequest, choice: Decision, voter: Voter | None = None
    ) -> Coroutine[Any, Any, Execution]:
        by: str | Identity | None = self.reviewer  # no quorums: as before
        if voter is not None and voter.kind == REVIEWER:
            by = self.identities[voter.name or ""]
        elif voter is not None:
            by = Identity(voter.name, CLAIMED) if voter.name is not None else None
        if isinstance(choice, Approve):
            return self.app.signal(
                request.execution_id,
                "approve",
                request_id=request.request_id,
                modified_params=choice.modified,
                by=by,
            )
        return self.app.signal(
            request.execution_id,
            "reject",
            request_id=request.request_id,
            reason=choice.reason,
            by=by,
        )

    def _refusal(
        self, request: ApprovalRequest, choice: Decision, voter: Voter | None
    ) -> tuple[str | None, str, str] | None:
        """Why Clearance must refuse a timely decision: (its code, or None where the
        machine does not say; what it is; the event), in the order Clearance checks."""
        rid = request.request_id
        current = self._current(request)
        quorum = self._needs(request.tool, current)
        requester = self.requested_by[request.execution_id]
        if isinstance(choice, Reject):
            if choice.reason is not None and not is_json(choice.reason):
                return None, f"rejecting {rid} with a broken reason", "broken reason refused"
        elif voter is not None and requester is not None and voter.name == requester:
            why = f"approving {rid} by {voter.name}, who asked for the run"
            return RefusalCode.SELF_APPROVAL, why, "self-approval refused"
        if voter is not None and quorum != (1, ()) and voter.kind not in (REVIEWER, APP):
            why = f"deciding {rid}, which needs {quorum}, by {voter}"
            return RefusalCode.NOT_GRANTED, why, "unknown person refused"
        if not isinstance(choice, Approve):
            return None
        if choice.modified is not None:
            schema = self.tool(request.tool).input_schema
            problem = modification_problem(schema, current, choice.modified)
            if problem is not None:
                return None, f"approving {rid}: {problem}", "invalid modification refused"
            verdict = self._verdict(request.tool, {**current, **choice.modified})
            if verdict is not None and verdict.applied == DENY:
                why = f"approving {rid} with changes rule {verdict.rule_id} denies"
                return RefusalCode.DENIED_BY_POLICY, why, "denied modification refused"
            if {**current, **choice.modified} != current:
                return None  # an edit: a new call, whose count starts with this approval
        counted = [b.by for b in self._counted(rid)]
        if voter is not None and quorum != (1, ()) and voter.name in counted:
            why = f"a second approval of {rid} by {voter.name}"
            return RefusalCode.ALREADY_VOTED, why, "second vote refused"
        return None

    def _decide(
        self, request: ApprovalRequest, choice: Decision, voter: Voter | None = None
    ) -> None:
        rid = request.request_id
        if self.clock.now() >= request.timeout:
            # Late: no sweep has run yet, but the deadline passed. The request times out
            # first (the model is told, or, where its tool says so, the call runs), and
            # the decision is refused.
            outcome = self._timed_out(request)
            said = ("already approved",) if outcome.by_timeout else ("timed out", "expired")
            try:
                self.run(self._signal(request, choice, voter))
            except ClearanceError as err:
                assert any(s in str(err) for s in said), (
                    f"a decision on {rid} after its deadline was refused for another reason: {err}"
                )
            else:
                raise AssertionError(f"Clearance took a decision on {rid} after its deadline")
            self.decided[rid] = outcome
            event("decide: late, " + ("approved by timeout" if outcome.by_timeout else "timed out"))
            return
        refusal = self._refusal(request, choice, voter)
        if refusal is not None:
            code, why, what = refusal
            self._refused(self._signal(request, choice, voter), why, code=code)
            event(f"decide: {what}")
            return
        ex = self.run(self._signal(request, choice, voter))
        self._returned(ex)
        by, kind = (self.reviewer, APP) if voter is None else (voter.name, voter.kind)
        if isinstance(choice, Reject):
            self.decided[rid] = Decided(REJECTED, by=by, reason=choice.reason)
            event("decide: rejected")
            return
        ballots = self.ballots.setdefault(rid, [])
        current = self._current(request)
        params = {**current, **(choice.modified or {})}
        # Clearance keeps every change accepted so far, as sent, also one that changes
        # nothing: the decision says what was sent.
        modified = ballots[-1].modified if ballots else None
        if choice.modified is not None:
            modified = {**(modified or {}), **choice.modified}
        edited = params != current
        needed, groups = self._needs(request.tool, params if edited else current)
        voters = [] if edited else [b.by for b in self._counted(rid)]
        voters.append(by)
        ballots.append(Ballot(by, kind, params, modified))
        if len(voters) < needed or not _covered(voters, groups, self.members):
            event("decide: a vote, the request stays pending" + (" (an edit)" if edited else ""))
            return
        self.decided[rid] = Decided(APPROVED, by=by, modified=modified)
        if needed > 1 or groups:
            event("decide: a vote meets the quorum")
        else:
            event("decide: approved" + (" with changes" if choice.modified is not None else ""))

    @precondition(lambda self: self.decided)
    @rule(data=st.data())
    def decide_again(self, data: st.DataObject) -> None:
        """A second decision (or one after a timeout, a stop): refused, naming the
        decision that stands, and nothing changes."""
        rid = data.draw(st.sampled_from(list(self.decided)), label="request")
        request = self.request(rid)
        choice = data.draw(decisions(self.tool(request.tool), request.parameters), label="decision")
        standing = STANDING[self.decided[rid].status]
        self._refused(self._signal(request, choice), f"a second decision on {rid}", standing)
        event(f"decide again: {standing}")
        self._observe()

    @precondition(lambda self: self.exec_ids)
    @rule(data=st.data(), reason=reasons())
    def stop(self, data: st.DataObject, reason: str | None) -> None:
        """Stop an execution: its pending requests are cancelled; a finished one refuses."""
        execution_id = data.draw(st.sampled_from(self.exec_ids), label="execution")
        ex = self.executions[execution_id]
        work = self.app.signal(execution_id, "stop", reason=reason, by=self.reviewer)
        if ex.status in TERMINAL:
            self._refused(work, f"stopping {ex.status} {execution_id}", f"is {ex.status}")
            event("stop: refused, finished")
        elif reason is not None and not is_json(reason):
            self._refused(work, f"stopping {execution_id} with a broken reason")
            event("stop: broken reason refused")
        else:
            stopped = self.run(work)
            assert stopped.status == "stopped", f"stop left {execution_id} {stopped.status}"
            self._returned(stopped)
            for request in ex.pending_approvals:
                self.decided[request.request_id] = Decided(
                    CANCELLED, by=self.reviewer, reason=reason
                )
            event(f"stop: {len(ex.pending_approvals)} pending cancelled")
        self._observe()

    def _advance_clock(self, milliseconds: int) -> None:
        """Time passes and nobody sweeps the timers: a decision now may come late."""
        self.clock.advance(milliseconds=milliseconds)

    def _let_time_pass(self, milliseconds: int) -> None:
        """Nobody decides: time passes and the due timers fire."""
        self.clock.advance(milliseconds=milliseconds)
        now = self.clock.now()
        due = [r for r in self.pending_requests() if r.timeout <= now]
        fired = self.run(self.app.fire_due_timers())
        assert fired == len(due), f"fired {fired} timers; due: {[r.request_id for r in due]}"
        for request in due:
            self.decided[request.request_id] = self._timed_out(request)
        approved = sum(self.decided[r.request_id].by_timeout for r in due)
        timed_out = fired - approved
        event(f"time passes: {min(timed_out, 2)}{'+' if timed_out > 2 else ''} timed out")
        if approved:
            event("time passes: approved by timeout")
        self._observe()

    def _timed_out(self, request: ApprovalRequest) -> Decided:
        """What becomes of `request` at its deadline, by the definition as the machine
        reads it: approved by nobody where its tool says `timeout_action="approve"` and
        the call needs one person's approval (a quorum is never met by a clock), else
        timed out (the model is told)."""
        one = self._needs(request.tool, self._current(request)) == (1, ())
        if self.tool(request.tool).timeout_action == APPROVE and one:
            return Decided(APPROVED, by_timeout=True)
        return Decided(TIMED_OUT)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def gated_calls_were_approved(self) -> None:
        """(a) No gated handler ran without an approval of that exact request, and it got
        exactly the approved parameters."""
        for call in self.calls:
            spec = self.spec.tool(call.tool)
            if spec is None:
                continue
            block = None
            if call.execution_id and call.turn is not None and call.tool_use_id:
                block = self._block(call.execution_id, call.turn, call.tool_use_id)
            effect = self._effect(call.tool, block["input"]) if block else _gating(spec)
            if effect == ALLOWED and not call.direct:
                self._check_allowed(call)
                continue
            if effect == UNGATED and not spec.gated:
                continue
            where = f"gated tool {call.tool!r}"
            assert effect != DENIED, f"{where} ran although the policy denies it: {call.params}"
            assert not call.direct, (
                f"{where}: its handler was called directly by the code of "
                f"{call.via or 'something outside a tool'} (request {call.request_id}, params "
                f"{call.params}), bypassing approval"
            )
            rid = call.request_id
            assert rid is not None, f"{where} ran without an approval request: {call.params}"
            self._check_quorum(where, call, self.request(rid))
            decided = self.decided.get(rid)
            assert decided is not None and decided.status == APPROVED, (
                f"{where} ran for request {rid}, which was "
                f"{decided.status if decided else 'never decided'}, not approved"
            )
            request = self.request(rid)
            assert (request.tool, request.execution_id, request.tool_use_id) == (
                call.tool,
                call.execution_id,
                call.tool_use_id,
            ), f"{where} ran under request {rid}, which is for another call: {request}"
            want = {**request.parameters, **(decided.modified or {})}
            assert same_json(call.params, want), (
                f"{where} ran for {rid} with {call.params}; approved: {want}"
            )
            kinds = APPROVALS | {APPROVED_BY_TIMEOUT}
            approvals = [r for r in self.audit if r.request_id == rid and r.decision in kinds]
            assert len(approvals) == 1, f"{where} ran for {rid} with {len(approvals)} approvals"

    def _check_quorum(self, where: str, call: HandlerCall, request: ApprovalRequest) -> None:
        """The approvals the machine saw Clearance take for exactly the call that ran
        (since its last edit) are of distinct known people, not the requester, as many as
        the definition asks for this call, one in each of its groups."""
        needed, groups = self._needs(call.tool, call.params)
        ballots = self._counted(request.request_id)
        voters = [b.by for b in ballots if b.params == call.params]
        requester = self.requested_by.get(request.execution_id)
        assert requester is None or requester not in voters, (
            f"{where} ran for {request.request_id} with the approval of {requester}, who "
            "asked for the run"
        )
        if (needed, groups) == (1, ()):
            return
        unknown = [b for b in ballots if b.kind not in (REVIEWER, APP)]
        assert not unknown, f"{where} ran for {request.request_id} counting {unknown}"
        assert len(set(voters)) == len(voters), f"{where}: someone voted twice: {voters}"
        who = ", ".join(f"{v} (groups {list(self.members.get(v or '', ()))})" for v in voters)
        assert len(voters) >= needed and _covered(voters, groups, self.members), (
            f"{where} ran for {request.request_id} with {call.params}, approved by "
            f"{who or 'nobody'}: no quorum; it needs {needed} approvals"
            + (f", one from each of {list(groups)}" if groups else "")
        )

    def _verdict(self, tool: str, params: Any) -> Verdict | None:
        """The agent's policy on a call with its defaults (None: no policy, or parameters
        the tool refuses): `core.policy.evaluate`'s verdict (your own invariants say what
        the rules should mean)."""
        spec = self.spec.tool(tool)
        policy = self.spec.policy
        if spec is None or policy is None or not acceptable_params(spec.input_schema, params):
            return None
        hosted = self.app._agents.get(self.tag)
        return evaluate(
            policy,
            agent=self.tag,
            tool=tool,
            args=with_defaults(spec.input_schema, params),
            predicates=hosted.predicates if hosted is not None else None,
        )

    def _effect(self, tool: str, params: Any) -> str:
        """How a proposed call is authorised: gated (a person decides), ungated, allowed
        or denied by the agent's policy."""
        spec = self.spec.tool(tool)
        verdict = self._verdict(tool, params)
        if verdict is None:
            return _gating(spec)
        return {DENY: DENIED, ASK: GATED, ALLOW: ALLOWED}.get(verdict.applied, _gating(spec))

    def _check_allowed(self, call: HandlerCall) -> None:
        """A call a policy allowed ran with no request, once, and is audited as allowed."""
        where = f"{call.tool!r} ({call.tool_use_id} of {call.execution_id})"
        assert call.request_id is None, f"{where}: allowed by the policy, yet ran for a request"
        records = [
            r
            for r in self.audit
            if (r.execution_id, r.tool_use_id, r.decision)
            == (call.execution_id, call.tool_use_id, "allowed_by_policy")
        ]
        assert records, f"{where} ran as allowed by the policy with no audit record saying so"
        assert same_json(records[-1].parameters, call.params), (
            f"{where} ran with {call.params}; the policy allowed {records[-1].parameters}"
        )

    @invariant()
    def approved_calls_ran_once(self) -> None:
        """(b) Each approved request ran exactly once; ungated tools never wait for
        approval and each valid ungated call ran once."""
        engine_calls = [c for c in self.calls if not c.direct]
        ran = Counter(c.request_id for c in engine_calls if c.request_id is not None)
        approved = [rid for rid, d in self.decided.items() if d.status == APPROVED]
        for rid in approved:
            assert ran[rid] == 1, f"approved request {rid} ran {ran[rid]} times"
        for rid, times in ran.items():
            assert rid in approved, f"request {rid} ran {times} times without an approval"
        ungated = Counter(
            (c.execution_id, c.turn, c.tool_use_id) for c in engine_calls if c.request_id is None
        )
        for (eid, turn, use_id), times in ungated.items():
            assert times == 1, f"ungated tool_use {use_id} of {eid} (turn {turn}) ran {times} times"
        # A handler passes its key to a payment API, which runs one call per key: two calls
        # that share one would lose the second.
        keys = Counter(c.idempotency_key for c in engine_calls)
        for key, times in keys.items():
            shared = [
                (c.tool, c.turn, c.tool_use_id) for c in engine_calls if c.idempotency_key == key
            ]
            assert times == 1, f"{times} different tool calls got idempotency key {key!r}: {shared}"
        for ex in self.executions.values():
            for request in ex.requests:
                spec = self.spec.tool(request.tool)
                turn = self.request_turns[request.request_id]
                block = self._block(ex.id, turn, request.tool_use_id)
                assert block is not None and block["name"] == request.tool, (
                    f"request {request.request_id} matches no tool_use of the model"
                )
                assert spec is not None and self._effect(request.tool, block["input"]) == GATED, (
                    f"{request.tool!r} waited for approval ({request.request_id}), though"
                    " neither its definition nor the policy asks for one"
                )
                assert acceptable_params(spec.input_schema, block["input"]), (
                    f"request {request.request_id} asks a person about parameters the tool "
                    f"refuses: {block['input']!r}"
                )
                want = with_defaults(spec.input_schema, block["input"])
                assert same_json(request.parameters, want), (
                    f"request {request.request_id} shows {request.parameters}; the model asked "
                    f"for {want} (defaults filled)"
                )
                if self.quorums:
                    self._check_shown_quorum(ex, request)

    def _check_shown_quorum(self, ex: Execution, request: ApprovalRequest) -> None:
        """A request shows the quorum its call needs now, who asked for the run, and,
        while pending, the votes counted for its call."""
        rid = request.request_id
        needed = self._needs(request.tool, self._current(request))
        shown = (request.approvals_required, request.groups)
        assert shown == needed, f"request {rid} asks for {shown}; its call needs {needed}"
        requester = self.requested_by[ex.id]
        assert request.requested_by == requester, (
            f"request {rid} says {request.requested_by!r} asked for the run, not {requester!r}"
        )
        if request.status == PENDING:
            votes = [v.by for v in request.votes]
            counted = [b.by for b in self._counted(rid)]
            assert votes == counted, f"request {rid} shows the votes of {votes}, not {counted}"

    def _block(self, execution_id: str, turn: int, tool_use_id: str) -> Block | None:
        """The tool_use block `tool_use_id` of one model turn, as the model sent it."""
        reply = self.puppet.replies.get((execution_id, turn), [])
        if _twinned(reply):
            return None
        return next((b for b in _uses(reply) if b.get("id") == tool_use_id), None)

    @invariant()
    def every_tool_use_answered_once(self) -> None:
        """(c) Every tool_use is answered exactly once in the next model call, with the
        right outcome, or the execution ended."""
        requests = self.puppet.requests
        for request in requests[self._checked_requests :]:
            self._check_model_request(request)
        self._checked_requests = len(requests)
        for ex in self.executions.values():
            turns = sorted(t for e, t in self.puppet.replies if e == ex.id)
            if not turns:
                continue
            last = self.puppet.replies[(ex.id, turns[-1])]
            if _twinned(last):
                assert ex.status == FAILED, f"{ex.id} took a reply with repeated tool_use ids"
            elif _uses(last):
                assert ex.status != COMPLETED, (
                    f"{ex.id} completed with tool_use blocks of turn {turns[-1]} unanswered"
                )

    def _check_model_request(self, request: ModelRequest) -> None:
        eid = request.execution_id
        ex = self.executions.get(eid)
        if ex is None:  # its start raised; nothing of it is kept
            return
        messages = request.messages
        assert messages[0] == {"role": "user", "content": ex.input}
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles
        for i in range(1, len(messages), 2):
            turn = (i + 1) // 2
            given = self.puppet.replies.get((eid, turn))
            assert given is not None, f"{eid}: the model is shown a turn {turn} it never said"
            assert same_json(messages[i]["content"], _stored(given)), (
                f"{eid}: turn {turn} is shown to the model otherwise than it said it"
            )
            uses = _uses(given)
            answer = messages[i + 1]["content"]
            assert isinstance(answer, list), f"{eid}: turn {turn}'s tool_use got a text answer"
            results = [b for b in answer if b.get("type") == "tool_result"]
            counted = Counter(r["tool_use_id"] for r in results)
            assert counted == Counter(u["id"] for u in uses), (
                f"{eid}: turn {turn}'s tool_use ids {[u['id'] for u in uses]} are answered by "
                f"tool_results {dict(counted)}"
            )
            by_id = {r["tool_use_id"]: r for r in results}
            for use in uses:
                self._check_result(ex, turn, use, by_id[use["id"]])

    def _check_result(self, ex: Execution, turn: int, use: Block, result: Block) -> None:
        content = str(result.get("content"))
        where = f"{ex.id}: the tool_result for {use['name']!r} ({use['id']})"
        spec = self.spec.tool(str(use["name"]))
        if spec is None or not acceptable_params(spec.input_schema, use["input"]):
            code = "unknown_tool" if spec is None else "invalid_parameters"
            assert result.get("is_error") is True and code in content, (
                f"{where} should be an {code} error: {result}"
            )
            return
        effect = self._effect(spec.tag, use["input"])
        if effect == DENIED:
            assert result.get("is_error") is True and "denied_by_policy" in content, (
                f"{where}: denied by the policy; the model was told {result}"
            )
            return
        if effect != GATED:
            ran = [
                c
                for c in self.calls
                if not c.direct
                and (c.execution_id, c.turn, c.tool_use_id) == (ex.id, turn, use["id"])
            ]
            assert len(ran) == 1, f"{where}: the {effect} tool ran {len(ran)} times"
            return
        request = next(
            (
                r
                for r in ex.requests
                if r.tool_use_id == use["id"] and self.request_turns[r.request_id] == turn
            ),
            None,
        )
        assert request is not None, f"{where}: a gated call was answered without a request"
        expected = {REJECTED: "approval_rejected", TIMED_OUT: "approval_timeout"}
        if request.status in expected:
            code = expected[request.status]
            assert result.get("is_error") is True and code in content, (
                f"{where}: the request was {request.status}; the model was told {result}"
            )
        else:
            assert request.status == APPROVED, f"{where}: answered while {request.status}"

    @invariant()
    def every_decision_audited_once(self) -> None:
        """(d) One audit record per decision, saying what was decided; timeouts as
        timed_out by nobody."""
        seen = getattr(self, "_audit_seen", [])
        assert self.audit[: len(seen)] == seen, "the audit log was rewritten"
        self._audit_seen = list(self.audit)
        # A policy's allow / deny of a call has no request: those are not decisions here.
        per_request: dict[str, list[AuditRecord]] = {}
        for record in self.audit:
            if record.request_id is not None:
                per_request.setdefault(record.request_id, []).append(record)
        voted = {rid for rid in self.ballots if self._votes(rid)}
        assert set(per_request) == set(self.decided) | voted, (
            f"audited {sorted(per_request)}, decided {sorted(self.decided)}, voted {sorted(voted)}"
        )
        for rid, records in per_request.items():
            votes = self._votes(rid)
            final = 1 if rid in self.decided else 0
            assert len(records) == len(votes) + final, (
                f"request {rid} has {len(records)} audit records "
                f"({[r.decision for r in records]}); expected {len(votes)} vote(s) and {final}"
                " decision"
            )
            for i, (record, ballot) in enumerate(zip(records, votes, strict=False)):
                # The vote that starts a count (the first, or an edit's) shows the changes.
                first = i == 0 or votes[i - 1].params != ballot.params
                self._check_vote_record(record, ballot, ballot.modified if first else None)
            if final:
                self._check_decision_record(records[-1])
        for ex in self.executions.values():
            for request in ex.requests:
                outcome = self.decided.get(request.request_id)
                status = outcome.status if outcome else PENDING
                assert request.status == status, (
                    f"request {request.request_id} is {request.status}, expected {status}"
                )

    def _check_vote_record(self, record: AuditRecord, ballot: Ballot, shown: Any) -> None:
        where = f"the audit record of a vote on {record.request_id}"
        assert record.decision == VOTE, f"{where} says {record.decision}; it was a vote"
        assert (record.by, record.by_kind) == (ballot.by, ballot.kind), (
            f"{where} names {record.by!r} ({record.by_kind}); it was {ballot.by} ({ballot.kind})"
        )
        assert same_json(record.modified_params, shown), (
            f"{where}: modified {record.modified_params}; it should show {shown}"
        )

    def _check_decision_record(self, record: AuditRecord) -> None:
        assert record.request_id is not None
        decided = self.decided[record.request_id]
        where = f"the audit record of {record.request_id}"
        expected = decided.status
        changed = {**record.parameters, **(decided.modified or {})} != record.parameters
        if expected == APPROVED and changed:
            expected = APPROVED_MODIFIED
        if decided.by_timeout:
            expected = APPROVED_BY_TIMEOUT
        assert record.decision == expected, f"{where} says {record.decision}; it was {expected}"
        if decided.status == TIMED_OUT:
            assert record.by is None and "timed out" in (record.reason or ""), (
                f"{where}: a timeout audited as by {record.by!r}, reason {record.reason!r}"
            )
        elif decided.by_timeout:
            assert record.by is None and "timeout_action='approve'" in (record.reason or ""), (
                f"{where}: an approval by timeout audited as by {record.by!r}, reason"
                f" {record.reason!r}"
            )
        else:
            assert record.by == decided.by, f"{where} names {record.by!r}"
        if decided.status == APPROVED:
            assert same_json(record.modified_params, decided.modified), (
                f"{where}: modified {record.modified_params}, sent {decided.modified}"
            )
        if decided.status == REJECTED:
            assert record.reason == decided.reason, f"{where}: reason {record.reason!r}"
        if decided.status == CANCELLED:
            assert record.reason == (decided.reason or "execution stopped"), (
                f"{where}: reason {record.reason!r}"
            )

    @invariant()
    def no_execution_left_stuck(self) -> None:
        """(e) Every execution rests: awaiting approval with a pending request, or
        finished with none."""
        for ex in self.executions.values():
            assert ex.status in RESTING, f"{ex.id} was left {ex.status}"
            if ex.status == AWAITING_APPROVAL:
                assert ex.pending_approvals, f"{ex.id} awaits approval with no pending request"
            else:
                assert not ex.pending_approvals, f"{ex.id} is {ex.status} with requests pending"
        pending = sorted(r.request_id for r in self.run(self.app.pending(self.tag)))
        assert pending == sorted(r.request_id for r in self.pending_requests()), (
            f"app.pending() lists {pending}"
        )

    @invariant()
    def replay_reproduces_state(self) -> None:
        """(f) Folding each execution's stored events gives its stored state, which is
        the state the last call on it returned."""
        for eid, ex in self.executions.items():
            if self._replayed.get(eid) == ex.seq:
                continue
            events = self.run(self.app.store.events(eid))
            assert len(events) == ex.seq, f"{eid}: {len(events)} events for seq {ex.seq}"
            folded = replay(ex.agent, None, events)
            assert folded == ex, f"replaying {eid}'s events does not give its stored state"
            returned = self.returned.get(eid)
            if returned is not None and returned.seq == ex.seq:
                assert returned == ex, f"{eid}: the state returned differs from the stored one"
            self._replayed[eid] = ex.seq


def _function(value: Any) -> Any:
    """The plain function behind a bound method (or the value itself)."""
    return getattr(value, "__func__", value)


def _copy(params: Any) -> dict[str, Any]:
    return copy.deepcopy(params) if isinstance(params, dict) else {}


__all__ = ["AgentMachine", "Decided", "HandlerCall", "Puppet"]
