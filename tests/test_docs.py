"""Every Python snippet in the README and docs/, and every example, runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for n, code in enumerate(FENCE.findall(doc.read_text()), 1):
            out.append((f"{doc.name}#{n}", code))
    return out


@pytest.mark.parametrize(("where", "code"), snippets(), ids=[w for w, _ in snippets()])
def test_doc_snippet_runs(where: str, code: str, tmp_path: Path) -> None:
    if "# needs: postgres" in code:
        from services import require

        require("postgres")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout}\n{proc.stderr}"


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"^```(?:sh|bash|shell)\n(.*?)^```", text, re.S | re.M)
    assert first_block is not None
    commands = [
        line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()
    ]
    assert commands == ["./scripts/example.sh", "./scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci


def test_main_example_runs_and_reports_every_order_once() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "checkout.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "all orders charged and reserved exactly once"
    assert len([line for line in lines if line.startswith("o-")]) == 5


def test_every_logger_of_the_library_is_named_in_the_readme() -> None:
    """A logger added to the code is added to the README's table, so users can find it."""
    readme = (ROOT / "README.md").read_text()
    named = re.compile(r"getLogger\(\s*(?:\"([^\"]+)\"|(__name__))")
    loggers: set[str] = set()
    for path in (ROOT / "src" / "msdata").rglob("*.py"):
        if "testing" in path.parts:
            continue
        for literal, dunder in named.findall(path.read_text()):
            if dunder:
                module = path.relative_to(ROOT / "src").with_suffix("")
                loggers.add(".".join(module.parts).removesuffix(".__init__"))
            else:
                loggers.add(literal)
    assert loggers, "no logger found: the pattern is stale"
    missing = sorted(name for name in loggers if f"| `{name}` |" not in readme)
    assert not missing, f"loggers not in the README's Logging table: {missing}"
