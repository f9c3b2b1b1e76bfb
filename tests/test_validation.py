"""What `decide()` and `define()` let in: only what JSON can carry, only what the tool declares.

Every value that reaches an execution's state is stored in its log, replayed and
sent on as JSON, so `decide()` refuses (with a `Refusal`, changing nothing) what
people send that JSON cannot carry, turns a model's unusable tool input into an
is_error tool result, and never raises anything but `Refusal`, whatever the
event holds. Definitions that could not work as written fail at `define()` time.
"""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_state_table import LOOKUP, REFUND, T0, Life, agent, lookup, refund, say, use

from clearance.core.agent import PARALLEL, AgentSpec, ToolSpec
from clearance.core.commands import PublishApprovalRequest, RunTool
from clearance.core.decide import decide
from clearance.core.errors import DefinitionError, Refusal
from clearance.core.events import (
    Approved,
    Event,
    ModelFailed,
    ModelReplied,
    Rejected,
    Started,
    StopRequested,
    Ticket,
    TimerFired,
    ToolFailed,
    ToolFinished,
)
from clearance.core.execution import DONE, Execution, Usage
from clearance.core.schema import to_json_schema
from clearance.core.wire import event_from_data, event_to_data, execution_to_data
from clearance.definition import HumanInLoop, Tool, compile_agent
from clearance.testing import ScriptedModel

LONE = "\udc80"  # a lone surrogate: valid in a Python str, not encodable as UTF-8


def at(life: Life) -> datetime:
    return life.now()


def refused(ex: Execution, event: Event, code: str, *words: str) -> Refusal:
    """`event` is refused with `code`, the message names `words`, and nothing changed."""
    before = copy.deepcopy(ex)
    with pytest.raises(Refusal) as caught:
        decide(ex, event)
    assert caught.value.code == code, f"{caught.value.code}: {caught.value}"
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {str(caught.value)!r}"
    assert ex == before
    str(caught.value).encode("utf-8")  # the message itself is always sendable
    return caught.value


def encodable(ex: Execution) -> None:
    """The state is strict JSON: what the log, the API and the model can carry."""
    json.dumps(execution_to_data(ex), allow_nan=False).encode("utf-8")


def awaiting_refund(spec: AgentSpec | None = None) -> Life:
    return Life(spec).start().reply(refund("tu1"))


def results(ex: Execution) -> list[dict[str, Any]]:
    last = ex.messages[-1]
    assert last["role"] == "user"
    return list(last["content"])


def spec_with(*tools: ToolSpec, order: str = "sequential") -> AgentSpec:
    return attrs.evolve(agent(order), tools=tools)


def tool(tag: str, schema: dict[str, Any], *, gated: bool = True, ms: int = 60_000) -> ToolSpec:
    return ToolSpec(tag, "", schema, gated=gated, approval_timeout_ms=ms)


# -- A1: NaN and Infinity -------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_modified_params_with_nan_or_infinity_are_refused(value: float) -> None:
    life = awaiting_refund()
    for modified in ({"amount": value}, {"amount": 5, "note": [1, value]}):
        refused(
            life.ex,
            Approved("apr-1", at(life), "bob", modified),
            "invalid_parameters",
            "modified_params",
            "finite numbers",
        )


@pytest.mark.parametrize(
    "params",
    [
        {"amount": math.nan},
        {"amount": math.inf},
        {"amount": -math.inf},
        {"amount": 5, "note": "caf" + LONE},
        {"amount": 5, "note": {"deep": [math.nan]}},
    ],
    ids=["nan", "inf", "-inf", "lone-surrogate", "nested-nan"],
)
def test_tool_input_json_cannot_carry_is_an_error_result_not_an_approval(
    params: dict[str, Any],
) -> None:
    life = Life().start()
    block = use("tu1", "refund", params)
    new, commands = decide(
        life.ex,
        ModelReplied(
            1, (say("refunding"), block), "tool_use", at(life), tickets=(Ticket("tu1", "a", "r"),)
        ),
    )
    assert not any(isinstance(c, PublishApprovalRequest | RunTool) for c in commands)
    assert new.requests == () and new.status == "running" and new.model_turn == 2
    [result] = results(new)
    assert result["tool_use_id"] == "tu1" and result["is_error"] is True
    error = json.loads(result["content"])
    assert error["error"] == "invalid_parameters"
    assert "input" in error["message"] and "accepted" in error["message"]
    encodable(new)


# -- A2: modified parameters may change, not add ----------------------------------------------


def test_modified_params_may_not_add_keys_the_tool_does_not_declare() -> None:
    life = awaiting_refund()
    refusal = refused(
        life.ex,
        Approved("apr-1", at(life), "bob", {"amout": 5}),
        "invalid_parameters",
        "'amout'",
        "amount, note",
    )
    assert "add" in str(refusal)


def test_modified_params_may_not_add_keys_to_a_full_json_schema_either() -> None:
    open_schema = to_json_schema(
        "refund",
        {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]},
    )
    assert "additionalProperties" not in open_schema
    life = awaiting_refund(spec_with(tool("refund", open_schema)))
    refused(
        life.ex,
        Approved("apr-1", at(life), "bob", {"amount": 3, "destination": "attacker"}),
        "invalid_parameters",
        "'destination'",
        "amount",
    )
    # Changing what the model proposed is what modified_params is for.
    new, _ = decide(life.ex, Approved("apr-1", at(life), "bob", {"amount": 3}))
    assert new.calls[0].parameters == {"amount": 3}


def test_modified_params_may_set_a_declared_parameter_the_model_left_out() -> None:
    life = awaiting_refund()
    assert life.ex.calls[0].parameters == {"amount": 10}
    _, commands = decide(life.ex, Approved("apr-1", at(life), "bob", {"note": "half"}))
    [run] = [c for c in commands if isinstance(c, RunTool)]
    assert run.parameters == {"amount": 10, "note": "half"}


def test_merged_parameters_are_validated_again() -> None:
    life = awaiting_refund()
    refused(
        life.ex,
        Approved("apr-1", at(life), "bob", {"amount": "ten"}),
        "invalid_parameters",
        "amount",
    )
    refused(
        life.ex,
        Approved("apr-1", at(life), "bob", {"amount": None}),
        "invalid_parameters",
        "amount",
    )


# -- A3: only strict JSON in the state, so a live state is its replay -------------------------


def replayed(event: Event) -> Event:
    return event_from_data(json.loads(json.dumps(event_to_data(event))))


def test_tuples_in_a_reply_are_stored_as_the_lists_replay_reads_back() -> None:
    schema = to_json_schema("tag", {"labels": {"type": "array", "required": True}})
    spec = spec_with(tool("tag", schema, gated=False), REFUND)
    life = Life(spec).start()
    reply = ModelReplied(
        1,
        (
            {"type": "text", "text": "tagging", "citations": ({"cited": ("a", "b")},)},
            use("tu1", "tag", {"labels": ("x", ("y", 1))}),
            use("tu2", "refund", {"amount": 5, "note": ("not", "text")}),
        ),
        "tool_use",
        at(life),
        tickets=(Ticket("tu1", "apr-1", "r"), Ticket("tu2", "apr-2", "r")),
    )
    live, live_commands = decide(life.ex, reply)
    again, again_commands = decide(life.ex, replayed(reply))
    assert live == again
    assert live_commands == again_commands
    assert live.calls[0].parameters == {"labels": ["x", ["y", 1]]}
    encodable(live)


@pytest.mark.parametrize(
    "content",
    [
        ("just text",),
        ({"text": "no type"},),
        ({"type": 5, "text": "type is a number"},),
        (["type", "text"],),
        "a plain string",
        None,
        ({"type": "text", "text": "ok"}, 3),
    ],
    ids=["str-block", "no-type", "int-type", "list-block", "str-content", "none", "int-block"],
)
def test_a_reply_that_is_not_content_blocks_is_an_invalid_reply(content: Any) -> None:
    life = Life().start()
    refused(life.ex, ModelReplied(1, content, "end_turn", at(life)), "invalid_reply", "content")


def test_a_reply_json_cannot_carry_outside_tool_input_is_an_invalid_reply() -> None:
    life = Life().start()
    for content, stop_reason in (
        (({"type": "text", "text": "bad " + LONE},), "end_turn"),
        (({"type": "text", "text": "ok", "score": math.nan},), "end_turn"),
        (({"type": "text", "text": "ok"},), None),
        (({"type": "text", "text": "ok"},), ["end_turn"]),
    ):
        refused(life.ex, ModelReplied(1, content, stop_reason, at(life)), "invalid_reply")  # type: ignore[arg-type]


# -- A4: nothing but Refusal escapes decide(); what cannot work is refused at define() --------

BROKEN_REF = {
    "type": "object",
    "properties": {"amount": {"$ref": "#/$defs/money"}},
    "required": ["amount"],
}


def test_a_schema_whose_ref_does_not_resolve_makes_an_error_result() -> None:
    spec = spec_with(tool("refund", BROKEN_REF), LOOKUP)
    life = Life(spec).start().reply(refund("tu1"), lookup("tu2"))
    assert life.ex.requests == ()
    [call] = [c for c in life.ex.calls if c.tool_use_id == "tu1"]
    assert call.status == DONE and call.result is not None and call.result.is_error
    assert isinstance(call.result.content, str)
    error = json.loads(call.result.content)
    assert "could not be evaluated" in error["message"]
    encodable(life.ex)


def test_define_refuses_a_ref_that_does_not_resolve() -> None:
    with pytest.raises(DefinitionError, match="'#/\\$defs/money'"):
        to_json_schema("refund", BROKEN_REF)
    with pytest.raises(DefinitionError, match="'#/\\$defs/money/allOf/3'"):
        to_json_schema(
            "t",
            {
                "type": "object",
                "$defs": {"money": {"allOf": [{"type": "number"}]}},
                "properties": {
                    "a": {"$ref": "#/$defs/money/allOf/0"},
                    "b": {"$ref": "#/$defs/money/allOf/3"},
                },
            },
        )
    with pytest.raises(DefinitionError, match=r"'https://example\.com/money\.json'"):
        to_json_schema(
            "t",
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/money.json"}}},
        )


def test_define_accepts_refs_that_resolve_and_they_validate() -> None:
    schema = to_json_schema(
        "refund",
        {
            "type": "object",
            "$defs": {
                "money": {"$anchor": "money", "type": "number", "minimum": 0},
                "a~b/c": {"type": "string"},
            },
            "properties": {
                "amount": {"$ref": "#/$defs/money"},
                "note": {"$ref": "#/$defs/a~0b~1c"},
                "again": {"$ref": "#money"},
                "self": {"$ref": "#"},
                "$ref": {"type": "string"},  # a parameter named "$ref" is not a reference
            },
            "required": ["amount"],
        },
    )
    life = Life(spec_with(tool("refund", schema))).start()
    life.reply(use("tu1", "refund", {"amount": -1}), use("tu2", "refund", {"amount": 1}))
    first, second = life.ex.calls
    assert first.status == DONE and first.result is not None and first.result.is_error
    assert second.status == "awaiting_approval"


MAX_MS = 31_622_400_000


def compile_with(tools: list[Tool], hitl: HumanInLoop) -> Any:
    return compile_agent(
        tag="a",
        name="a",
        product="",
        model=ScriptedModel([]),
        model_name="scripted",
        system_prompt="",
        tools=tools,
        human_in_loop=hitl,
        max_iterations=20,
    )


def handler(ctx: Any, params: dict[str, Any]) -> str:
    return "ok"


def test_define_refuses_approval_timeouts_beyond_366_days() -> None:
    gated = [Tool(tag="t", handler=handler, requires_confirmation=True)]
    for too_long in (10**15, MAX_MS + 1):
        with pytest.raises(DefinitionError, match=f"at most {MAX_MS}.*366 days"):
            compile_with(gated, HumanInLoop(enabled=True, approval_timeout=too_long))
        with pytest.raises(DefinitionError, match=f"tool 't'.*at most {MAX_MS}"):
            compile_with(
                [attrs.evolve(gated[0], approval_timeout=too_long)], HumanInLoop(enabled=True)
            )
    hosted = compile_with(gated, HumanInLoop(enabled=True, approval_timeout=MAX_MS))
    assert hosted.spec.tools[0].approval_timeout_ms == MAX_MS


def test_approval_timeouts_take_any_duration_the_one_parser_reads() -> None:
    """Milliseconds as in the spec, or a timedelta or "10m", like every other duration."""
    gated = Tool(tag="t", handler=handler, requires_confirmation=True)
    for given_as, ms in (("10m", 600_000), (timedelta(hours=2), 7_200_000), (300_000, 300_000)):
        hosted = compile_with([gated], HumanInLoop(enabled=True, approval_timeout=given_as))
        assert hosted.spec.tools[0].approval_timeout_ms == ms
        hosted = compile_with(
            [attrs.evolve(gated, approval_timeout=given_as)], HumanInLoop(enabled=True)
        )
        assert hosted.spec.tools[0].approval_timeout_ms == ms
    for bad, says in (("367d", "at most 31622400000"), ("0s", "above zero"), (1.5, "an int")):
        with pytest.raises(DefinitionError, match=says):
            compile_with([gated], HumanInLoop(enabled=True, approval_timeout=bad))  # type: ignore[arg-type]


@pytest.mark.parametrize("ms", [10**15, 10**20])
def test_a_deadline_that_cannot_be_computed_is_an_error_result(ms: int) -> None:
    life = Life(spec_with(tool("refund", REFUND.input_schema, ms=ms), LOOKUP)).start()
    life.reply(refund("tu1"), lookup("tu2"))
    assert life.ex.requests == ()
    first = life.ex.call("tu1")
    assert first is not None and first.status == DONE
    assert first.result is not None and first.result.is_error
    assert "approval deadline" in str(first.result.content)


def test_a_deadline_past_the_calendar_is_an_error_result() -> None:
    spec = spec_with(REFUND)
    end = datetime.max.replace(tzinfo=UTC) - timedelta(seconds=10)
    ex, _ = decide(Execution(agent=spec), Started("exec-1", "go", end))
    new, _ = decide(
        ex, ModelReplied(1, (refund("tu1"),), "tool_use", end, tickets=(Ticket("tu1", "a", "r"),))
    )
    call = new.calls[0] if new.calls else None
    assert new.requests == ()
    assert call is None or call.status == DONE  # answered; the next turn may have begun


# -- A5: always_require_approval without human_in_loop -----------------------------------------


def test_always_require_approval_without_human_in_loop_is_a_definition_error() -> None:
    tools = [Tool(tag="t", handler=handler)]
    with pytest.raises(DefinitionError, match=r"always_require_approval.*'t'.*not enabled"):
        compile_with(tools, HumanInLoop(always_require_approval=["t"]))
    assert not compile_with(tools, HumanInLoop(enabled=False)).spec.tools[0].gated
    assert compile_with(tools, HumanInLoop(True, ["t"])).spec.tools[0].gated


# -- A6: text people send must be text UTF-8 can carry -----------------------------------------


def test_people_cannot_send_text_utf8_cannot_carry() -> None:
    refused(Execution(agent=agent()), Started("exec-1", "hi " + LONE, T0), "invalid_event", "input")
    refused(
        Execution(agent=agent()),
        Started("exec-1", "hi", T0, session_id=LONE),
        "invalid_event",
        "session_id",
    )
    life = awaiting_refund()
    now = at(life)
    refused(life.ex, Approved("apr-1", now, by=LONE), "invalid_event", "by")
    refused(
        life.ex,
        Approved("apr-1", now, "bob", {"note": "x" + LONE}),
        "invalid_parameters",
        "modified_params.note",
    )
    refused(life.ex, Rejected("apr-1", now, by="bob", reason=LONE), "invalid_event", "reason")
    # How a decider is known: one of reviewer | app | claimed, and only beside a name.
    refused(life.ex, Approved("apr-1", now, "bob", by_kind="boss"), "invalid_event", "by_kind")
    refused(life.ex, Rejected("apr-1", now, by_kind="app"), "invalid_event", "qualifies no")
    refused(life.ex, Rejected("apr-1", now, by=LONE), "invalid_event", "by")
    refused(life.ex, StopRequested(now, by="ops", reason=LONE), "invalid_event", "reason")
    refused(life.ex, StopRequested(now, by=LONE), "invalid_event", "by")


def test_non_text_where_text_belongs_is_refused() -> None:
    life = awaiting_refund()
    now = at(life)
    refused(Execution(agent=agent()), Started("exec-1", 42, T0), "invalid_event", "input")  # type: ignore[arg-type]
    refused(life.ex, Rejected("apr-1", now, by="bob", reason=3), "invalid_event", "reason")  # type: ignore[arg-type]
    refused(life.ex, StopRequested(now, by=["ops"]), "invalid_event", "by")  # type: ignore[arg-type]
    refused(life.ex, Approved("apr-1", now.replace(tzinfo=None), "bob"), "invalid_event", "at")


def test_outcomes_that_happened_are_recorded_with_what_utf8_cannot_carry_made_visible() -> None:
    """A tool's result or a model's failure is not refused (it happened, and refusing it
    would strand the run); what UTF-8 cannot carry is spelled out as an escape."""
    life = Life().start().reply(lookup("tu1"))
    new, _ = decide(life.ex, ToolFinished("tu1", "found " + LONE, at(life)))
    assert results(new)[0]["content"] == "found \\udc80"
    encodable(new)
    new, _ = decide(life.ex, ToolFailed("tu1", "boom " + LONE, at(life)))
    encodable(new)
    new, _ = decide(life.ex, ToolFinished("tu1", {"when": datetime(2024, 1, 1)}, at(life)))
    assert "2024-01-01" in json.dumps(results(new))
    circular: dict[str, Any] = {}
    circular["self"] = circular
    new, _ = decide(life.ex, ToolFinished("tu1", circular, at(life)))
    encodable(new)
    failed, _ = decide(Life().start().ex, ModelFailed(1, "overloaded " + LONE, at(life)))
    assert failed.status == "failed"
    encodable(failed)


# -- C: refusal codes ------------------------------------------------------------------------

CODES = {
    "unknown_execution",
    "unknown_signal",
    "missing_request_id",
    "unknown_request",
    "already_decided",
    "expired",
    "not_due",
    "wrong_state",
    "invalid_parameters",
    "stale_model_reply",
    "stale_tool_result",
    "invalid_reply",
    "invalid_event",
    "not_granted",
    "denied_by_policy",
    "invalid_remember",
    "stale_decision",
    "host_required",
    "self_approval",
    "already_voted",
    "extension_too_long",
    "invalid_deadline",
}


def test_refusal_codes_are_one_enum_that_reads_as_plain_strings() -> None:
    from clearance.core.errors import InvalidParameters, RefusalCode

    assert {code.value for code in RefusalCode} == CODES
    plain = Refusal("invalid_reply", "x")
    assert plain.code is RefusalCode.INVALID_REPLY
    assert plain.code == "invalid_reply" and f"{plain.code}" == "invalid_reply"
    assert json.dumps({"code": plain.code}) == '{"code": "invalid_reply"}'
    assert Refusal(RefusalCode.EXPIRED, "x").code == "expired"
    assert InvalidParameters("t", ["a: bad"]).code is RefusalCode.INVALID_PARAMETERS
    with pytest.raises(ValueError, match="unknown refusal code 'nope'"):
        Refusal("nope", "x")


# -- and never anything but Refusal ----------------------------------------------------------

JUNK_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from(["", "ok", LONE, "a\ud800b", "tu1", "apr-1", "refund", "tool_use", "text"]),
    st.text(max_size=4),
    st.datetimes(),
    st.just(object()),
)
JUNK = st.recursive(
    JUNK_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["type", "id", "name", "input", "text", 1]), inner),
    ),
    max_leaves=8,
)
TIMES = st.one_of(
    st.datetimes(timezones=st.just(UTC)),
    st.just(datetime.max.replace(tzinfo=UTC)),
    st.just(datetime.min.replace(tzinfo=UTC)),
    st.datetimes(),
    JUNK_SCALARS,
)
BLOCKS = st.one_of(
    st.builds(use, st.sampled_from(["tu1", "tu2", ""]), st.sampled_from(["refund", "x"]), JUNK),
    st.builds(say, st.text(max_size=3)),
    JUNK,
)


def maybe(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any] = JUNK) -> Any:
    return st.one_of(valid, valid, junk)


EVENTS = st.one_of(
    st.builds(Started, maybe(st.just("exec-1")), maybe(st.text(max_size=3)), TIMES, JUNK),
    st.builds(
        ModelReplied,
        maybe(st.integers(0, 3)),
        maybe(st.lists(BLOCKS, max_size=3).map(tuple)),
        maybe(st.sampled_from(["end_turn", "tool_use", "max_tokens"])),
        TIMES,
        maybe(st.builds(Usage, maybe(st.integers(0, 9)), maybe(st.integers(0, 9)))),
        maybe(
            st.lists(
                st.builds(Ticket, st.sampled_from(["tu1", "tu2"]), maybe(st.just("apr-9")), JUNK),
                max_size=2,
            ).map(tuple)
        ),
    ),
    st.builds(ModelFailed, maybe(st.integers(0, 3)), JUNK, TIMES),
    st.builds(ToolFinished, maybe(st.sampled_from(["tu1", "tu2"])), JUNK, TIMES),
    st.builds(ToolFailed, maybe(st.sampled_from(["tu1", "tu2"])), JUNK, TIMES),
    st.builds(Approved, maybe(st.just("apr-1")), TIMES, JUNK, JUNK),
    st.builds(Rejected, maybe(st.just("apr-1")), TIMES, JUNK, JUNK),
    st.builds(TimerFired, maybe(st.just("apr-1")), TIMES),
    st.builds(StopRequested, TIMES, JUNK, JUNK),
)
STATES = {
    "created": lambda: Life(),
    "awaiting model": lambda: Life().start(),
    "awaiting approval": lambda: awaiting_refund(),
    "parallel": lambda: Life(agent(PARALLEL)).start().reply(lookup("tu1"), refund("tu2")),
    "stopped while running": lambda: Life().start().reply(lookup("tu1")).stop(),
}
BUILT = {name: build().ex for name, build in STATES.items()}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.sampled_from(sorted(BUILT)), event=EVENTS)
def test_decide_raises_nothing_but_refusal_whatever_the_event_holds(state: str, event: Any) -> None:
    ex = BUILT[state]
    before = copy.deepcopy(ex)
    try:
        new, _ = decide(ex, event)
    except Refusal as refusal:
        assert ex == before
        str(refusal).encode("utf-8")
    else:
        assert ex == before
        encodable(new)


@pytest.mark.parametrize("huge", ["99999999999d", 10**20, "9" * 30 + "ms"])
def test_a_duration_too_long_for_any_clock_is_refused_saying_so(huge: int | str) -> None:
    """Not an OverflowError from deep inside datetime: the one duration parser says what
    was wrong, so the API refuses it as for any other bad duration."""
    from clearance.core.durations import BadDuration, parse_duration

    with pytest.raises(BadDuration, match=r"too long.*at most"):
        parse_duration(huge, "older_than")
    if isinstance(huge, int):  # as far the other way: not a duration at all
        with pytest.raises(BadDuration, match="must be above zero"):
            parse_duration(-huge, "older_than")


@pytest.mark.parametrize("bare", ["5", " 90 ", "0"])
def test_a_number_as_text_needs_a_unit(bare: str) -> None:
    """`--older-than 5` is not guessed (5 ms would prune everything): the message says
    which units it takes, with that number."""
    from clearance.core.durations import BadDuration, parse_duration

    number = bare.strip()
    with pytest.raises(BadDuration, match=rf"needs a unit: '{number}s', '{number}m'"):
        parse_duration(bare, "--older-than")


def test_a_command_line_duration_is_explained_as_text() -> None:
    """An option's bad duration is explained in the terms of a command line (text with
    a unit), not the Python API's (an int of milliseconds, a timedelta)."""
    from clearance.core.durations import BadDuration, parse_duration

    with pytest.raises(BadDuration) as bad:
        parse_duration("1.5h", "--older-than")
    assert "a number with a unit: '30s'" in str(bad.value) and "timedelta" not in str(bad.value)
    with pytest.raises(BadDuration, match="a timedelta"):
        parse_duration("1.5h", "older_than")
