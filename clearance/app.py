"""`Clearance`: the composition root. Opens a store, hosts agents, runs and decides them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from importlib.metadata import entry_points
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs

from clearance.adapters.clock import SystemClock
from clearance.adapters.ids import RandomIds
from clearance.adapters.webhook_channel import WebhookChannel
from clearance.adapters.webhook_sender import WebhookSender, signed_headers
from clearance.broker_decisions import Decision, consume
from clearance.callback import callback_url, secret_bytes
from clearance.core.agent import AgentSpec, BrokerTarget
from clearance.core.audit_chain import ChainRow, ChainWalk
from clearance.core.audit_chain import Verdict as AuditVerdict
from clearance.core.commands import AuditRecord
from clearance.core.deadlines import extendable_until, parse_deadline
from clearance.core.durations import parse_duration
from clearance.core.errors import ClearanceError, DefinitionError, Refusal
from clearance.core.events import Event
from clearance.core.execution import ApprovalRequest, Execution
from clearance.core.policy import PolicySpec
from clearance.core.reviewers import (
    CLAIMED,
    REVIEWER,
    Delegation,
    Identity,
    Reviewer,
    ReviewerKey,
)
from clearance.core.rows import AGENT_SIGNER
from clearance.definition import (
    BROKER_NAME,
    DEFAULT_MAX_ITERATIONS,
    HostedAgent,
    HumanInLoop,
    Model,
    Policy,
    Tool,
    compile_agent,
)
from clearance.delivery import DeliveryRelay
from clearance.engine import (
    DEFAULT_LEASE,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_RENEW_EVERY,
    Engine,
    new_worker_id,
)
from clearance.ports.broker import Broker, Signer
from clearance.ports.clock import Clock
from clearance.ports.ids import IdSource
from clearance.ports.model import ModelPort
from clearance.ports.store import Delivery, Store, UnknownReviewer, UnreadableExecution
from clearance.reviewer_keys import key_id_of, key_matches, new_key

if TYPE_CHECKING:
    from clearance.policy_replay import ReplayReport

log = logging.getLogger("clearance")


@attrs.frozen
class BatchOutcome:
    """One request's outcome in `decide_many`: the execution as the decision left it, or
    the refusal that left the request as it was."""

    request_id: str
    execution: Execution | None
    refusal: Refusal | None


DEFAULT_POLL_INTERVAL = 0.2  # seconds between looks for decisions made by other processes


@attrs.frozen
class ExecutionHistory:
    """An execution's current state and every event that led to it, oldest first."""

    execution: Execution
    events: tuple[Event, ...]

    @property
    def id(self) -> str:
        return self.execution.id

    @property
    def status(self) -> str:
        return self.execution.status

    @property
    def output(self) -> str | None:
        return self.execution.output

    @property
    def pending_approvals(self) -> list[ApprovalRequest]:
        return self.execution.pending_approvals


def open_store(url: str, *, synchronous: str = "FULL") -> Store:
    """The store a URL names: its scheme is looked up among the `clearance.stores` entry
    points (sqlite:///PATH, memory://, postgresql://…, and any a package adds); a plain
    path is a SQLite file."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    scheme = url.split("://", 1)[0]
    opener = _plugin("clearance.stores", scheme, f"unsupported store URL scheme '{scheme}://'")
    store: Store = opener(url, synchronous=synchronous)
    return store


def _plugin(group: str, scheme: str, unsupported: str) -> Any:
    """The function the entry point `scheme` of `group` names (a package can add one)."""
    found = entry_points(group=group, name=scheme) if scheme else ()
    if not found:
        known = sorted({e.name for e in entry_points(group=group)})
        raise ClearanceError(f"{unsupported}; accepted: " + ", ".join(f"{k}://" for k in known))
    try:
        return next(iter(found)).load()
    except ImportError as err:
        extra = {"postgresql": "postgres", "postgres": "postgres"}.get(scheme, scheme)
        raise ClearanceError(
            f"{scheme}:// needs a package that is not installed ({err.name}):"
            f" pip install 'clearance[{extra}]'"
        ) from None


def open_brokers(brokers: Mapping[str, str], sign: Signer) -> dict[str, Broker]:
    """The brokers named to `Clearance.open(brokers={name: url})`, by the URL's scheme
    through the `clearance.channels` entry points (a package can add one). Nothing
    connects here: a broker that is down at start is not fatal."""
    if not isinstance(brokers, Mapping):
        raise ClearanceError(
            "brokers maps names to URLs, e.g. {'approval-events': 'redis://127.0.0.1:6379/0'}"
        )
    opened: dict[str, Broker] = {}
    for name, url in brokers.items():
        if not isinstance(name, str) or not BROKER_NAME.match(name):
            raise ClearanceError(f"broker name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        scheme = url.split("://", 1)[0] if isinstance(url, str) and "://" in url else ""
        opener = _plugin("clearance.channels", scheme, f"broker {name!r}: unsupported URL {url!r}")
        try:
            opened[name] = opener(name, url, sign=sign)
        except ValueError as err:
            raise ClearanceError(f"broker {name!r}: {err}") from None
    return opened


@attrs.define
class Pruning:
    """What `Clearance.prune` did (or, with `dry_run`, would do). Two prunes of one
    store at the same time (a job on two hosts) share the work: each execution is
    forgotten, and counted, by one of them."""

    dry_run: bool = False
    executions: int = 0  # forgotten
    audit_pruned: int = 0  # their audit records, payload dropped
    audit_kept: int = 0  # their records older than the audit chain, left whole
    audit_unreadable: int = 0  # their records changed outside Clearance, left for verify
    busy: int = 0  # finished, but a worker was still recording a tool's outcome: next time
    unreadable: int = 0  # executions that could not be read, left as they are


class Clearance:
    """Human approval gates for an agent's tool calls, durable in a store.

    Use as `async with Clearance.open("sqlite:///approvals.db") as app:`; inside
    the block a background task picks up decisions made by other processes
    and, on a real clock, fires approval timeouts as they fall due.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock | None = None,
        ids: IdSource | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        public_url: str | None = None,
        webhook_secret: str | Sequence[str] | None = None,
        api_key: str | None = None,
        trust_header: str | None = None,
        webhook_timeout: float = 10.0,
        webhook_retry_base: float = 1.0,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        lease: float = DEFAULT_LEASE,
        renew_every: float = DEFAULT_RENEW_EVERY,
        brokers: Mapping[str, str] | None = None,
    ) -> None:
        # Several: rotation. The first signs webhooks and callback tokens, any is accepted.
        secrets = (webhook_secret,) if isinstance(webhook_secret, str) else webhook_secret
        self.webhook_secrets: tuple[str, ...] = tuple(secrets or ())
        for secret in self.webhook_secrets:
            secret_bytes(secret)  # a malformed secret fails here, not at first delivery
        self.store = store
        self.public_url = public_url.rstrip("/") if public_url else None
        self.webhook_secret = self.webhook_secrets[0] if self.webhook_secrets else None
        self.api_key = api_key  # bearer token for the HTTP API's signal/read routes
        # A header an SSO proxy in front of this API sets to the signed-in reviewer's
        # name (off unless named: anyone can send any header).
        self.trust_header = trust_header.lower() if trust_header else None
        self.clock: Clock = clock or SystemClock()
        self.poll_interval = poll_interval
        self._agents: dict[str, HostedAgent] = {}
        self.engine = Engine(
            store,
            self.clock,
            ids or RandomIds(),
            new_worker_id(),
            self._agents,
            max_concurrency=max_concurrency,
            lease=lease,
            renew_every=renew_every,
        )

        def secret_for(delivery: Delivery) -> str | None:
            """Who signs a webhook: the agent's own secret, or the instance's."""
            if delivery.signer == AGENT_SIGNER:
                agent = self._agents.get(delivery.agent_tag)
                return agent.webhook_secret if agent else None
            return self.webhook_secret

        def sign(delivery: Delivery, body: str) -> dict[str, str] | None:
            """Standard Webhooks headers for a message published on a broker."""
            secret = secret_for(delivery)
            if secret is None:
                return None
            return signed_headers(secret, delivery.webhook_id, self.clock.now(), body)

        webhook = WebhookChannel(WebhookSender(webhook_timeout), secret_for, self.clock)
        self.brokers = open_brokers(brokers or {}, sign)
        # Approval requests go out through the channels (closed with the relay).
        self.webhooks = DeliveryRelay(
            store,
            self.clock,
            self.engine.worker,
            self._agents,
            [webhook, *self.brokers.values()],
            public_url=lambda: self.public_url,
            secret=lambda: self.webhook_secret,
            timeout=webhook_timeout,
            retry_base=webhook_retry_base,
        )
        self.engine.on_deliveries = self.webhooks.wake
        self._background: asyncio.Task[None] | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._driving: set[asyncio.Task[Execution]] = set()
        # Reading decisions off a broker: (broker, event) -> the task.
        self._consumers: dict[BrokerTarget, asyncio.Task[None]] = {}
        self._retired_models: list[ModelPort] = []  # replaced by define(); closed on close()

    @classmethod
    def open(
        cls,
        url: str = "sqlite:///clearance.db",
        *,
        clock: Clock | None = None,
        ids: IdSource | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        synchronous: str = "FULL",
        public_url: str | None = None,
        webhook_secret: str | Sequence[str] | None = None,
        api_key: str | None = None,
        trust_header: str | None = None,
        webhook_timeout: float = 10.0,
        webhook_retry_base: float = 1.0,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        lease: float = DEFAULT_LEASE,
        renew_every: float = DEFAULT_RENEW_EVERY,
        brokers: Mapping[str, str] | None = None,
    ) -> Clearance:
        """`public_url` is where this instance's HTTP API is reachable (callbackUrl is
        built on it); `webhook_secret` ('whsec_…') signs webhooks and callback tokens
        (a list: the first signs, every one is accepted, to rotate without breaking the
        callback URLs already sent);
        `api_key` protects the HTTP API's signal and read routes (it stands for reviewer
        `admin`, granted everything; reviewers' own keys work beside it);
        `trust_header` names a header (e.g. "X-Forwarded-User") a proxy in front of the
        API sets to the signed-in reviewer's name, who must be a registered reviewer.

        `max_concurrency` bounds the model calls and tool runs this process carries
        out at once (sync handlers run on a thread pool of that size). Each is
        claimed with a lease of `lease` seconds, renewed every `renew_every` while
        it runs; work whose lease runs out is taken over by any process.

        `brokers` names the message brokers agents publish approval requests on
        (`HumanInLoop(approval_broker=ApprovalBroker(broker=NAME, event=...))`):
        {NAME: "redis://…" | "nats://…" | "amqp://…" | "memory://…"}."""
        # Checked before the store is opened, so a bad broker URL leaves nothing open
        # (brokers connect on first use: making them here touches no server).
        open_brokers(brokers or {}, lambda delivery, body: None)
        return cls(
            open_store(url, synchronous=synchronous),
            clock=clock,
            ids=ids,
            poll_interval=poll_interval,
            public_url=public_url,
            webhook_secret=webhook_secret,
            api_key=api_key,
            trust_header=trust_header,
            webhook_timeout=webhook_timeout,
            webhook_retry_base=webhook_retry_base,
            max_concurrency=max_concurrency,
            lease=lease,
            renew_every=renew_every,
            brokers=brokers,
        )

    async def __aenter__(self) -> Clearance:
        self._background = asyncio.create_task(self._watch(), name="clearance-watch")
        # Apart from the watch loop, so a slow receiver never delays decisions or timers.
        self._delivering = asyncio.create_task(self._deliver(), name="clearance-webhooks")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop background work and close the store. Work cut short here is
        taken over by the next process that hosts the agent."""
        tasks = [
            *self._driving,
            *self._consumers.values(),
            *(t for t in (self._background, self._delivering) if t),
        ]
        pending = set(tasks)
        while pending:
            # Again until each is done: a database driver may swallow a cancellation
            # that lands while it hands out a connection, and the task then goes on.
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a failure was logged where it happened
        self._background = self._delivering = None
        self._consumers.clear()
        await self.engine.close()
        await self.webhooks.aclose()
        for model in [*self._retired_models, *(a.model for a in self._agents.values())]:
            close_model = getattr(model, "aclose", None)
            if close_model is not None:
                with contextlib.suppress(Exception):
                    await close_model()
        await self.store.close()

    # -- defining agents -------------------------------------------------------------------

    def define(
        self,
        *,
        tag: str,
        model: Model | ModelPort,
        tools: Sequence[Tool] = (),
        name: str = "",
        product: str = "",
        system_prompt: str = "",
        human_in_loop: HumanInLoop | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
    ) -> None:
        """Define (or redefine) an agent hosted by this process. Raises DefinitionError."""
        if isinstance(model, Model):
            port, model_name = _model_port(model), model.model
        elif hasattr(model, "reply"):
            port, model_name = model, getattr(model, "name", type(model).__name__)
        else:
            raise ClearanceError(
                "model must be Model(provider=..., model=...) or an object with "
                f"async reply(request), got {type(model).__name__}"
            )
        hitl = human_in_loop or HumanInLoop()
        if hitl.approval_webhook and not (self.public_url and self.webhook_secret):
            raise DefinitionError(
                "approval_webhook needs a callbackUrl to send: open Clearance with "
                "public_url='https://…' (where its HTTP API is reachable) and "
                "webhook_secret='whsec_…'"
            )
        if hitl.webhook_secret is not None:
            secret_bytes(hitl.webhook_secret)
        agent = compile_agent(
            tag=tag,
            name=name,
            product=product,
            model=port,
            model_name=str(model_name),
            system_prompt=system_prompt,
            tools=tools,
            human_in_loop=hitl,
            max_iterations=max_iterations,
        )
        broker = agent.spec.approval_broker
        if broker is not None and not (self.webhook_secret or hitl.webhook_secret):
            raise DefinitionError(
                "approval_broker signs its messages as webhooks are signed: open Clearance"
                " with webhook_secret='whsec_…', or give the agent"
                " HumanInLoop(webhook_secret='whsec_…')"
            )
        if broker is not None and broker.broker not in self.brokers:
            raise DefinitionError(
                f"approval_broker names broker {broker.broker!r}, which this process was not"
                f" opened with (brokers: {', '.join(sorted(self.brokers)) or 'none'}); pass"
                f" Clearance.open(..., brokers={{{broker.broker!r}: 'redis://…'}})"
            )
        replaced = self._agents.get(tag)
        if replaced is not None and replaced.model is not port:
            self._retired_models.append(replaced.model)
        self._agents[tag] = agent

    # -- running and deciding -------------------------------------------------------------

    async def run(
        self,
        tag: str,
        *,
        input: str,
        session_id: str | None = None,
        requested_by: str | None = None,
    ) -> Execution:
        """Start an execution; returns when it rests (awaiting_approval or finished).
        `requested_by`: the person asking for the run, who may then not approve its
        requests (four eyes)."""
        return await self._shielded(self.engine.start(tag, input, session_id, requested_by))

    async def signal(
        self,
        execution_id: str,
        signal: str,
        *,
        request_id: str | None = None,
        modified_params: dict[str, Any] | None = None,
        reason: str | None = None,
        by: str | Identity | None = None,
        remember: str | None = None,
        remember_when: str | None = None,
        digest: str | None = None,
        until: datetime | str | None = None,
    ) -> Execution:
        """`approve` (optionally with `modified_params`), `reject` (with `reason`), `stop`,
        or `extend` (a pending request's deadline to `until`, within the longest its tool
        allows: `Tool(max_approval_timeout=...)`; a reviewer needs the 'extend' grant).

        Where a request needs a quorum (`approvals_required`, `groups`), an approval is a
        vote: the request stays pending, showing its `votes`, until enough distinct
        people (never the run's `requested_by`) approved the same call; an approval with
        changed parameters starts the count again. Any one rejection rejects it.

        `digest`: the request's `digest` as the decider saw it; the decision is refused
        (`stale_decision`) if the request asks about another call.

        `remember="execution"` with an approval: later calls of the same tool in this
        execution (within `remember_when`, a CEL bound on `args`, if given) run without
        a request, audited as allowed_by_grant; a policy's deny still wins.

        `by` is who decides: a name is this code's word for it (recorded as `app`); an
        `Identity` says how it is known, and a reviewer's is held to its grants.

        Where this process hosts the agent, returns when the execution rests;
        elsewhere it records the decision and returns, and the hosting process
        carries on."""
        return await self._shielded(
            self.engine.signal(
                execution_id,
                signal,
                request_id=request_id,
                modified_params=modified_params,
                reason=reason,
                by=by,
                remember=remember,
                remember_when=remember_when,
                digest=digest,
                until=until,
            )
        )

    async def decide(
        self,
        request_id: str,
        *,
        approved: bool,
        reason: str | None = None,
        modified_params: dict[str, Any] | None = None,
        by: str | Identity | None = None,
        remember: str | None = None,
        remember_when: str | None = None,
        digest: str | None = None,
    ) -> Execution:
        """Decide by request id alone, as the spec's callback body does (`remember`,
        `digest`: as for `signal`)."""
        return await self._shielded(
            self._decision(
                request_id,
                approved,
                reason=reason,
                modified_params=modified_params,
                by=by,
                remember=remember,
                remember_when=remember_when,
                digest=digest,
            )
        )

    async def decide_many(
        self,
        request_ids: Sequence[str],
        *,
        approved: bool,
        reason: str | None = None,
        by: str | Identity | None = None,
    ) -> list[BatchOutcome]:
        """One decision for each of `request_ids`, each on its own: a refusal of one (not
        granted, already decided, expired, unknown) refuses only that one. Returns once
        every decision is recorded, one outcome per id in order; the approved tools run
        in the background, here or in a process that hosts their agent."""
        outcomes = []
        for request_id in request_ids:
            try:
                ex = await self._shielded(
                    self._decision(request_id, approved, reason=reason, by=by, settle=False)
                )
            except Refusal as refusal:
                outcomes.append(BatchOutcome(request_id, None, refusal))
            else:
                outcomes.append(BatchOutcome(request_id, ex, None))
        return outcomes

    async def replay_policy(
        self,
        policy: Policy | PolicySpec,
        *,
        agent_tag: str | None = None,
        since: datetime | None = None,
    ) -> ReplayReport:
        """What `policy` would have done to every call recorded here (of `agent_tag`'s
        agent, proposed since `since`): counts before and after, and the calls whose
        outcome changes (`clearance policy replay`)."""
        from clearance.policy_replay import replay_policy

        spec = policy.spec() if isinstance(policy, Policy) else policy
        return await replay_policy(self.store, spec, agent_tag=agent_tag, since=since)

    async def pending(
        self, agent_tag: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[ApprovalRequest]:
        """Every pending approval request across executions, oldest first. Page with
        `limit`, and `after=` the last request id of the page before."""
        return await self.store.pending(agent_tag, limit, after)

    async def extendable(self, requests: Sequence[ApprovalRequest]) -> dict[str, datetime]:
        """The latest deadline an extend signal may give each of `requests`, by request
        id (`core.deadlines.extendable_until`), judged by the spec the signal is judged
        by: the agent's current definition (a signal first judges a pending request made
        under an older one again), or, where none is recorded, the execution's own. One
        definition read per agent, no execution loaded; a request that cannot be
        extended (further), or whose execution cannot be read, is left out."""
        await self.engine.define_agents()  # as a signal would: those defined here count
        specs: dict[str, AgentSpec | None] = {}
        latest: dict[str, datetime] = {}
        for request in requests:
            tag = request.agent_tag
            if tag not in specs:
                specs[tag] = await self.store.current_agent(tag)
            spec = specs[tag]
            if spec is None:
                try:
                    ex = await self.store.load(request.execution_id)
                except UnreadableExecution:
                    continue  # one execution that cannot be read must not take a listing down
                if ex is None:
                    continue
                spec = ex.agent
            until = extendable_until(request, spec.tool(request.tool))
            if until is not None:
                latest[request.request_id] = until
        return latest

    async def get_execution(self, execution_id: str) -> ExecutionHistory:
        ex = await self.store.load(execution_id)
        if ex is None:
            raise Refusal("unknown_execution", f"no execution '{execution_id}'")
        return ExecutionHistory(ex, tuple(await self.store.events(execution_id)))

    async def audit(
        self, *, execution_id: str | None = None, request_id: str | None = None
    ) -> list[AuditRecord]:
        return await self.store.audit(execution_id, request_id)

    async def verify_audit(self, page: int = 10_000) -> AuditVerdict:
        """Walk the whole audit chain (a page of rows at a time) and say whether every
        record is as it was written: the first record changed, removed or inserted is
        named (`AuditVerdict.problem`), with the number of records that fit before it."""
        walk = ChainWalk()
        after = 0
        while True:
            rows = await self.store.audit_chain(after, page)
            if not walk.feed(rows) or len(rows) < page:
                break
            after = rows[-1].id
        head = await self.store.audit_head()
        return walk.finish(*(head if head is not None else (None, None)))

    async def prune(
        self, older_than: int | timedelta | str, *, dry_run: bool = False, page: int = 200
    ) -> Pruning:
        """Forget executions that finished (completed, failed or stopped) more than
        `older_than` ago ("90d", a timedelta, or milliseconds): their event logs, inbox
        rows and deliveries are deleted, and their audit records keep who decided what
        and when, but drop the parameters, modified parameters and reason (their hashes
        stay, so `verify_audit` still holds). Executions still running or awaiting
        approval are never touched, however old. `dry_run`: count, change nothing."""
        now = self.clock.now()
        cutoff = now - parse_duration(older_than, "older_than")
        report = Pruning(dry_run=dry_run)
        after: str | None = None
        while True:
            # Only executions the store lists as finished before the cutoff: a prune
            # with little to do is quick however many executions are kept.
            ids = await self.store.finished_before(cutoff, after=after, limit=page)
            due: list[Execution] = []
            for execution_id in ids:
                try:
                    ex = await self.store.load(execution_id)
                except UnreadableExecution:
                    report.unreadable += 1
                    continue
                if ex is not None and ex.finished_at is not None and ex.finished_at < cutoff:
                    due.append(ex)
            if due:
                gone = await self.store.forget(due, now, dry_run=dry_run)
                report.executions += len(gone.executions)
                report.audit_pruned += gone.audit_pruned
                report.audit_kept += gone.audit_kept
                report.audit_unreadable += gone.audit_unreadable
                # Gone already: another prune forgot it first, and counted it.
                report.busy += len(due) - len(gone.executions) - gone.vanished
            if len(ids) < page:
                return report
            after = ids[-1]

    async def audit_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        """Audit rows with their place in the hash chain, in order, from id `after`:
        what `clearance audit export` writes."""
        return await self.store.audit_chain(after, limit)

    def callback_url(self, request: ApprovalRequest, purpose: str = "request") -> str:
        """The spec's callbackUrl for `request`: POST a decision there, no API key needed."""
        if not self.public_url or not self.webhook_secret:
            raise ClearanceError(
                "callback URLs need Clearance.open(..., public_url='https://…', "
                "webhook_secret='whsec_…')"
            )
        return callback_url(self.public_url, self.webhook_secret, request, purpose)

    def asgi(self) -> Any:
        """The HTTP API as an ASGI app (Starlette), to serve or mount in your own app."""
        from clearance.http_api import build_asgi

        return build_asgi(self)

    async def deliver_webhooks(self) -> int:
        """Attempt every webhook delivery that is due now and wait for the answers;
        returns how many were attempted. The background task does this by itself."""
        return await self.webhooks.deliver_due()

    async def deliveries(self, request_id: str) -> list[Delivery]:
        """Every webhook delivery of one approval request, with each attempt."""
        return await self.store.deliveries(request_id)

    async def fire_due_timers(self) -> int:
        """Time out every approval due at `clock.now()`; returns how many. Returns when
        the executions it moved rest again (the model has been told)."""
        fired = await self.engine.fire_due_timers()
        await asyncio.gather(*(self._shielded(self.engine.settle(ex)) for ex in fired))
        return len(fired)

    # -- background ---------------------------------------------------------------------

    async def _shielded(self, work: Coroutine[Any, Any, Execution]) -> Execution:
        """Run `work` so that a caller who gives up (a cancelled web request, a
        wait_for timeout) does not strand the execution half-driven: the work
        goes on in this process and the caller just stops waiting for it."""
        task = asyncio.ensure_future(work)
        self._driving.add(task)
        self.engine.callers += 1  # from now, not once it runs: see Engine.callers
        task.add_done_callback(self._driven)
        return await asyncio.shield(task)

    def _driven(self, task: asyncio.Task[Execution]) -> None:
        self._driving.discard(task)
        self.engine.callers -= 1

    async def _deliver(self) -> None:
        while True:
            try:
                await self.webhooks.start_due()
            except Exception:
                log.exception("clearance webhook step failed")
                await asyncio.sleep(self.poll_interval)
            await self.webhooks.wait(self.poll_interval)

    def _consume_decisions(self) -> None:
        """Read decisions off every broker an agent hosted here publishes on."""
        for agent in list(self._agents.values()):
            target = agent.spec.approval_broker
            if target is None or target in self._consumers:
                continue
            self._consumers[target] = asyncio.create_task(
                consume(
                    self.brokers[target.broker],
                    target,
                    self.engine.worker,
                    self._record_decision,
                    self._request,
                ),
                name=f"clearance-decisions-{target.broker}-{target.event}",
            )

    async def _record_decision(self, decision: Decision) -> None:
        """A decision from a broker: recorded, and its work started here or elsewhere;
        the consumer does not wait for a tool to finish."""
        await self._decision(
            decision.request_id,
            decision.approved,
            reason=decision.reason,
            modified_params=decision.modified_params,
            by=Identity(decision.by, CLAIMED) if decision.by else None,  # the sender's word
            settle=False,
            digest=decision.digest,
        )

    async def _decision(self, request_id: str, approved: bool, **options: Any) -> Execution:
        """Approve or reject a request known by its id alone (`decide`, a batch, a
        broker); `options` are `Engine.signal`'s (reason, modified_params, by, ...)."""
        execution_id = await self.store.execution_of_request(request_id)
        if execution_id is None:
            raise Refusal("unknown_request", f"no approval request '{request_id}'")
        return await self.engine.signal(
            execution_id, "approve" if approved else "reject", request_id=request_id, **options
        )

    async def _request(self, request_id: str) -> ApprovalRequest | None:
        execution_id = await self.store.execution_of_request(request_id)
        ex = await self.store.load(execution_id) if execution_id else None
        return ex.request(request_id) if ex else None

    async def _watch(self) -> None:
        while True:
            self._consume_decisions()
            try:
                await self.engine.pickup()
                if self.clock.drives_timers:
                    await self.engine.fire_due_timers()
                await self.engine.sweep_redefined()
            except Exception:  # keep watching: one bad execution must not stop the rest
                log.exception("clearance background step failed")
            try:
                await self.engine.wait_for_work(self.poll_interval)
            except Exception:
                log.exception("clearance could not wait for work")
                await asyncio.sleep(self.poll_interval)

    # -- reviewers: who may decide what, and the keys they prove it with -------------------

    async def save_reviewer(self, reviewer: Reviewer) -> bool:
        """Register `reviewer`, or replace its grants and groups (its delegations stay
        unless it names some: `delegate` changes them); True when it is new."""
        if not reviewer.delegations:
            stored = await self.store.reviewer(reviewer.name)
            if stored is not None and stored.delegations:
                reviewer = attrs.evolve(reviewer, delegations=stored.delegations)
        return await self.store.save_reviewer(reviewer)

    async def delegate(self, reviewer: str, *, to: str, until: datetime | str) -> Reviewer:
        """Let reviewer `to` act with `reviewer`'s grants until `until` (an aware
        datetime, or ISO-8601 text with its offset; a past time ends a delegation now).
        Decisions made so are audited as by `to`, on behalf of `reviewer`. Raises
        UnknownReviewer, or ClearanceError for a delegation to oneself or a time that
        is not a point in time (naive, a date alone)."""
        until = parse_deadline(until, "until=")
        if to == reviewer:
            raise ClearanceError(f"reviewer {reviewer!r} cannot delegate to themselves")
        giver = await self.store.reviewer(reviewer)
        taker = await self.store.reviewer(to)
        for name, found in ((reviewer, giver), (to, taker)):
            if found is None:
                raise UnknownReviewer(f"no reviewer {name!r}: register them first")
        assert giver is not None
        now = self.clock.now()
        kept = tuple(d for d in giver.delegations if d.to != to and d.active_at(now))
        given = (Delegation(to, until, now),) if until > now else ()
        changed = attrs.evolve(giver, delegations=kept + given)
        await self.store.save_reviewer(changed)
        return changed

    async def reviewers(self) -> list[Reviewer]:
        return await self.store.reviewers()

    async def remove_reviewer(self, name: str) -> bool:
        """Remove a reviewer and every key of theirs; False when there was none."""
        return await self.store.remove_reviewer(name)

    async def issue_key(self, reviewer: str, *, expires_at: datetime | None = None) -> str:
        """A new key for `reviewer`, to hand over once: only its digest is kept."""
        text, key = new_key(reviewer, self.clock.now(), expires_at)
        await self.store.add_key(key)
        return text

    async def reviewer_keys(self, reviewer: str) -> list[ReviewerKey]:
        """A reviewer's keys (ids, times; never the secrets), oldest first."""
        return await self.store.reviewer_keys(reviewer)

    async def revoke_key(self, key_id: str) -> bool:
        return await self.store.revoke_key(key_id, self.clock.now())

    async def identify(self, key: str) -> Identity | None:
        """The reviewer a key belongs to, if it is one of theirs and still valid."""
        key_id = key_id_of(key)
        stored = await self.store.reviewer_key(key_id) if key_id else None
        if stored is None or not stored.valid_at(self.clock.now()):
            return None
        if not key_matches(key, stored):
            return None
        return await self.reviewer_identity(stored.reviewer)

    async def reviewer_identity(self, name: str) -> Identity | None:
        """A registered reviewer as an identity (a trusted header names one), with the
        reviewers whose grants are delegated to them now."""
        reviewer = await self.store.reviewer(name)
        if reviewer is None:
            return None
        now = self.clock.now()
        delegators = tuple(
            r for r in await self.store.reviewers() if r.delegates_to(reviewer.name, now)
        )
        return Identity(reviewer.name, REVIEWER, reviewer, delegators)

    # -- reads for the HTTP API and the CLI ------------------------------------------------

    async def execution_of_request(self, request_id: str) -> str | None:
        """The id of the execution approval request `request_id` belongs to, or None."""
        return await self.store.execution_of_request(request_id)

    async def request_ids_starting(self, prefix: str, limit: int = 10) -> list[str]:
        """Ids of approval requests, pending or decided, that start with `prefix` (at
        most `limit`, in id order): to complete an id a person shortened, as git does."""
        return await self.store.request_ids_starting(prefix, limit)

    async def with_work(self, agent_tag: str) -> list[str]:
        """Executions of agent `agent_tag` with work waiting or under way (a model call, an
        approved tool run): a process that hosts the agent carries them on."""
        return await self.store.with_work([agent_tag])

    async def request(self, request_id: str) -> ApprovalRequest | None:
        """Approval request `request_id` as it stands now (pending or decided), or None."""
        execution_id = await self.store.execution_of_request(request_id)
        ex = await self.store.load(execution_id) if execution_id else None
        return ex.request(request_id) if ex else None

    async def execution(self, execution_id: str) -> Execution | None:
        """Execution `execution_id`'s current state without its events, or None."""
        return await self.store.load(execution_id)


def _model_port(model: Model) -> ModelPort:
    if model.provider == "anthropic":
        from clearance.adapters.anthropic_model import AnthropicModel

        return AnthropicModel(model)
    if model.provider == "openai":
        from clearance.adapters.openai_model import OpenAIModel

        return OpenAIModel(model)
    raise ClearanceError(
        f"unknown model provider {model.provider!r}; accepted: 'anthropic', 'openai', or pass any "
        "object with async reply(request) as model="
    )
