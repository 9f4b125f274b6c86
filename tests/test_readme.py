"""The README's snippets run exactly as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README snippet {name!r} not found"
    return match.group(1)


def test_own_model_snippet_runs():
    code = snippet("own-model")
    assert 8 <= len(code.strip().splitlines()) <= 20
    exec(compile(code, "README.md:own-model", "exec"), {})


def test_beacon_snippet_runs():
    exec(compile(snippet("beacon"), "README.md:beacon", "exec"), {})
