"""Project conventions: CI runs exactly the README's test command."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^Tests:\s*\n+```bash\n(.+?)\n```", readme, re.M | re.S)
    assert block, "README.md has no bash block under 'Tests:'"
    command = block.group(1).strip()
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command: {command}"
