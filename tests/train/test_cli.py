"""The ``lcjax`` command line: help, train with overrides, eval and generate on the run directory, errors."""

import json
import os
import subprocess
import sys

import pytest

from lcjax import cli
from lcjax.train import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = f"{os.path.join(ROOT, 'configs', 'mqar.py')}:smoke"
QUIET = ["--config.progress_bar=False", "--config.mesh.num_devices=1"]


def test_help_lists_the_subcommands_and_override_syntax(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "eval", "generate"))
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--config.optim.learning_rate" in out and "--workdir" in out and "resumes" in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``lcjax train`` in-process (the same smoke run as tests/train/test_train.py, so its compilations are reused)."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    assert cli.main(["train", "--config", SMOKE, "--workdir", workdir, *QUIET]) == 0
    return workdir


def test_train_then_eval_and_generate(trained, capsys):
    assert [r["step"] for r in metrics.read_metrics(trained) if r["split"] == "eval"] == [4, 8]
    assert cli.main(["eval", "--workdir", trained]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 8 and 0 <= result["answer_accuracy"] <= 1
    last_eval = [r for r in metrics.read_metrics(trained) if r["split"] == "eval"][-1]
    assert result["answer_accuracy"] == last_eval["answer_accuracy"]  # the same checkpoint, the same split

    assert cli.main(["generate", "--workdir", trained, "--prompt", "3 20 5 25 3", "--max_new_tokens", "4"]) == 0
    tokens = [int(t) for t in capsys.readouterr().out.split()]
    assert len(tokens) == 4 and all(0 <= t < 32 for t in tokens)


def test_errors_name_the_problem(trained, capsys):
    assert cli.main(["train", "--config", SMOKE, "--workdir", "/tmp/unused", "--config.optim.lr=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert cli.main(["train", "--config", SMOKE, "--workdir", "/tmp/unused", "--config.data.task_args.seq_len=-4"]) == 2
    assert "config.data.task_args" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--workdir", trained, "--prompt", "not ids"])
    assert "whitespace-separated ids" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(trained) + "_missing"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_user_errors_exit_2_with_one_line_naming_the_problem(trained, capsys):
    """A misspelt key after valid ones, a config file that does not exist, prompt ids outside the vocabulary."""
    argv = ["train", "--config", SMOKE, "--workdir", "/tmp/unused", "--config.num_steps=3", "--config.optim.lr=1"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("lcjax train: error: unknown config key 'config.optim.lr'")
    assert cli.main(["train", "--config", "configs/nope.py", "--workdir", "/tmp/unused"]) == 2
    err = capsys.readouterr().err
    assert "config file 'configs/nope.py' does not exist" in err and "Traceback" not in err
    for prompt in ("3 20 32", "-1 3"):
        assert cli.main(["generate", "--workdir", trained, "--prompt", prompt]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lcjax generate: error: --prompt: token ids must be in [0, vocab_size=32)"), err


def test_python_dash_m_lcjax_train_help():
    out = subprocess.run(
        [sys.executable, "-m", "lcjax.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert out.returncode == 0 and "--config" in out.stdout and "--workdir" in out.stdout
