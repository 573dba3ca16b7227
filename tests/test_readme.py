"""The README's quick start runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    block = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its quick start block"
    exec(compile(block.group(1), "README quickstart", "exec"), {})


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()
