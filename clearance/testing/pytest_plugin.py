"""The `clearance` pytest plugin (entry point `pytest11`), for testing code built on
Clearance:

- `clearance_clock`: a `FakeClock` (time stands still until you `advance()` it);
- `clearance_app`: a `Clearance` on `memory://` with that clock, open for the test
  (`async with` done for you; define your agents on it);
- `scripted_model`: a factory, `scripted_model([[text("hi")], ...])` -> a
  `ScriptedModel` that plays those turns;
- `--clearance-examples N`: examples per `AgentMachine` test (Hypothesis's
  `max_examples`), e.g. a few in every commit's CI and thousands nightly.

Loading the plugin imports nothing but pytest (and pytest-asyncio where installed, for
its async fixture): `clearance` itself is imported by the fixtures, when a test asks
for one, and Hypothesis only with `--clearance-examples`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest

try:  # async fixtures need an async plugin; pytest-asyncio's decorator works in any mode
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - then the user's own async plugin runs them
    async_fixture = pytest.fixture  # type: ignore[assignment]

if TYPE_CHECKING:
    from clearance.app import Clearance
    from clearance.testing import FakeClock, ScriptedModel


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("clearance")
    group.addoption(
        "--clearance-examples",
        type=int,
        metavar="N",
        default=None,
        help="examples per AgentMachine test (Hypothesis max_examples)",
    )


def pytest_configure(config: pytest.Config) -> None:
    examples = config.getoption("--clearance-examples")
    if examples is None:
        return
    if examples < 1:
        raise pytest.UsageError(f"--clearance-examples is a positive number, got {examples}")
    from clearance.testing import machine

    machine.EXAMPLES = examples


@pytest.fixture
def clearance_clock() -> FakeClock:
    from clearance.testing import FakeClock

    return FakeClock()


@async_fixture
async def clearance_app(clearance_clock: FakeClock) -> AsyncIterator[Clearance]:
    from clearance import Clearance

    async with Clearance.open("memory://", clock=clearance_clock) as app:
        yield app


@pytest.fixture
def scripted_model() -> Callable[..., ScriptedModel]:
    from clearance.testing import ScriptedModel

    def make(turns: list[list[dict[str, Any]]]) -> ScriptedModel:
        return ScriptedModel(turns)

    return make
