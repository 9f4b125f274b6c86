"""The README's snippets run exactly as written."""

import os
import pathlib
import re
import subprocess
import sys

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


def test_sharding_snippet_runs_on_eight_devices_and_on_one():
    code = snippet("sharding")
    exec(compile(code, "README.md:sharding", "exec"), {})  # conftest: 8 CPU devices
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
