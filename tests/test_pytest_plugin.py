"""The `clearance` pytest plugin, as a user's test suite gets it: installed through its
`pytest11` entry point, in a fresh pytest process over a test file of the user's."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

USERS_TESTS = """
import pytest
from hypothesis.stateful import invariant

from clearance import HumanInLoop, Tool
from clearance.testing import text, tool_use
from clearance.testing.machine import AgentMachine

SEEN = []


async def refund(ctx, params):
    return {"refunded": params["amount"]}


TOOLS = [
    Tool(
        tag="process-refund",
        parameters={"amount": {"type": "number", "required": True}},
        requires_confirmation=True,
        handler=refund,
    )
]


@pytest.mark.asyncio
async def test_the_fixtures(clearance_app, clearance_clock, scripted_model):
    clearance_app.define(
        tag="refunds",
        model=scripted_model([[tool_use("process-refund", {"amount": 5})], [text("Done.")]]),
        tools=TOOLS,
        human_in_loop=HumanInLoop(enabled=True),
    )
    ex = await clearance_app.run("refunds", input="Refund 5")
    assert ex.status == "awaiting_approval"
    assert ex.pending_approvals[0].timestamp == clearance_clock.now()  # the fake clock
    done = await clearance_app.decide(ex.pending_approvals[0].request_id, approved=True)
    assert (done.status, done.output) == ("completed", "Done.")


class Refunds(AgentMachine):
    agent = dict(tag="refunds", tools=TOOLS, human_in_loop=HumanInLoop(enabled=True))

    @invariant()
    def counted(self):
        SEEN.append(id(self))


TestRefunds = Refunds.TestCase


def test_zz_examples_were_as_many_as_asked():
    print(f"EXAMPLES={len(set(SEEN))}")
"""


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_users_agent.py").write_text(textwrap.dedent(USERS_TESTS))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_plugin_gives_users_fixtures_and_scales_their_machines(tmp_path: Path) -> None:
    ran = _run(tmp_path, "--clearance-examples", "7")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "3 passed" in ran.stdout, ran.stdout
    [seen] = [int(n) for n in re.findall(r"EXAMPLES=(\d+)", ran.stdout)]
    # One machine per example; Hypothesis does not count an example a precondition
    # turned away, so a few more may run. Without the option: 100.
    assert 7 <= seen < 20, ran.stdout
    refused = _run(tmp_path, "--clearance-examples", "0")
    assert refused.returncode != 0 and "positive number" in refused.stderr, refused.stderr


def test_loading_the_plugin_does_not_import_the_harness(tmp_path: Path) -> None:
    """Installed, the plugin loads in every pytest run of the environment: it must not
    pull in the harness (Hypothesis strategies, hypothesis-jsonschema) or Clearance's
    runtime. (Hypothesis itself is loaded by Hypothesis's own pytest plugin.)"""
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import sys\n"
        "def test_probe():\n"
        "    heavy = ('clearance.testing.machine', 'clearance.testing.strategies',"
        " 'hypothesis_jsonschema', 'clearance.app', 'clearance.engine')\n"
        "    print('LOADED=' + ','.join(m for m in heavy if m in sys.modules))\n"
        "    assert 'clearance.testing.pytest_plugin' in sys.modules\n"
    )
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(probe)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.search(r"LOADED=$", ran.stdout, re.M), ran.stdout
