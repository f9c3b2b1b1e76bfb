"""The README's Quick start is `examples/quickstart.py`, and it runs as shipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quickstart.py"


def test_the_readme_quick_start_is_the_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start") :]
    block = re.search(r"```python\n(.*?)```\n", section, re.DOTALL)
    assert block is not None
    assert block.group(1) == EXAMPLE.read_text()


def test_the_quick_start_runs_offline_without_a_warning(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLEARANCE_"))}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE)],
        cwd=tmp_path,  # it writes approvals.db where it runs
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "status: awaiting_approval"
    assert "status: completed | output: I've processed the $50 refund." in lines
    assert "audit: approved by ops-lead" in lines
    assert "events: started, model_replied, approved, tool_finished, model_replied" in lines
    assert (tmp_path / "approvals.db").is_file()


def test_the_readmes_secret_recipe_makes_a_secret_clearance_accepts() -> None:
    from clearance.callback import secret_bytes

    readme = (ROOT / "README.md").read_text()
    recipe = re.search(r'`python -c "(import base64, secrets;[^"]+)"`', readme)
    assert recipe is not None
    made = subprocess.run(
        [sys.executable, "-c", recipe.group(1)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert made.startswith("whsec_") and len(secret_bytes(made)) == 32
