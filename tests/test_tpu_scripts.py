"""tpu_scripts/ parse as bash and launch the same module the README and Makefile use."""

import pathlib
import subprocess

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "tpu_scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_launchers_run_the_trainer_module():
    for name in ("launch.sh", "slurm_gpu.sh"):
        assert "-m lcjax.train --config" in (SCRIPTS[0].parent / name).read_text()
