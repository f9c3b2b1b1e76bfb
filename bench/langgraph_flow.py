"""The refund flow as a LangGraph graph: a scripted agent node, a tool node that
calls `interrupt()` before the gated tool, resumed with `Command(resume=...)`.

No `from __future__ import annotations` here: LangGraph reads the node
functions' type hints at graph-building time and needs real types.
"""

from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt

from bench.agents import ANSWER, INPUT, PARAMS, RESULT, SAYS, TOOL


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def agent(state: State) -> dict[str, Any]:
    """The scripted model: call the tool on the first turn, answer on the second."""
    turn = sum(1 for m in state["messages"] if isinstance(m, AIMessage))
    if turn == 0:
        call = {"name": TOOL, "args": dict(PARAMS), "id": "toolu_01_01", "type": "tool_call"}
        return {"messages": [AIMessage(content=SAYS, tool_calls=[call])]}
    return {"messages": [AIMessage(content=ANSWER)]}


def tools(state: State) -> dict[str, Any]:
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    call = last.tool_calls[0]
    decision = interrupt({"tool": call["name"], "parameters": call["args"]})
    content = str(RESULT) if decision.get("approved") else "rejected"
    return {"messages": [ToolMessage(content=content, tool_call_id=call["id"])]}


def route(state: State) -> str:
    last = state["messages"][-1]
    return "tools" if isinstance(last, AIMessage) and last.tool_calls else END


def builder() -> Any:
    """An uncompiled graph; compile it with a checkpointer."""
    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tools", tools)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph


async def approved_cycle(graph: Any, thread: str) -> None:
    """One cycle on a compiled graph with an async checkpointer: run to the interrupt
    before the tool, then resume it approved, each checkpoint written before returning."""
    config: Any = {"configurable": {"thread_id": thread}}
    out = await graph.ainvoke({"messages": [HumanMessage(INPUT)]}, config, durability="sync")
    assert "__interrupt__" in out, out
    out = await graph.ainvoke(Command(resume={"approved": True}), config, durability="sync")
    assert "ORD-123" in out["messages"][-1].content
