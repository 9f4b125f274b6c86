"""The training loop in-process: outputs, eval/generate from a workdir, NaN stop, corrupted-checkpoint fallback,
crash paths of the run directory (torn metrics line, atomic rewrites, config.json, one eval per step), the first
batch's token-id check, gradient accumulation, and the 8-device CPU mesh under the dp / fsdp / fsdp_tp presets
against one device."""

import glob
import json
import math
import os
import re
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcjax import data as data_lib
from lcjax import sharding
from lcjax.train import checkpoint as ckpt_lib
from lcjax.train import config_io as config_lib
from lcjax.train import loop, metrics, state
from lcjax.train import workdir as workdir_lib
from tolerances import EXACT, F32_OP, F32_SHARDED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MQAR = os.path.join(ROOT, "configs", "mqar.py")
TEXT = os.path.join(ROOT, "configs", "text_bytes.py")


def smoke_config(path=MQAR, arg="smoke", **overrides):
    """The config file's smoke variant on one device, quiet; ``overrides`` use ``__`` for nesting."""
    quiet = {"progress_bar": False, "mesh.num_devices": 1}
    c = config_lib.load_config_file(path, arg)
    return config_lib.override(c, quiet | {key.replace("__", "."): value for key, value in overrides.items()})


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if r["split"] == "train"}


def saved_params(workdir, step):
    path = os.path.join(workdir, loop.CHECKPOINT_DIR, str(step), "model")
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(path)
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The smoke run every other test compares with: 8 steps on one device, eval and checkpoint every 4."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    result = loop.train(smoke_config(), workdir)
    return workdir, result, train_losses(workdir), saved_params(workdir, 8)


def test_train_writes_checkpoints_metrics_plot(base_run, capfd):
    workdir, result, _, _ = base_run
    assert result.step == 8 and not result.preempted
    assert set(result.eval) >= {"loss", "answer_accuracy", "example_accuracy", "tokens"}
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [4, 8]
    records = metrics.read_metrics(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
    assert {"loss", "grad_norm", "param_norm", "learning_rate", "tokens_per_s"} <= set(records[0])
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.path.getsize(os.path.join(workdir, "metrics.png")) > 10_000
    assert os.path.exists(os.path.join(workdir, "config.json"))


def test_rerunning_a_finished_run_restores_and_evaluates_again(base_run, tmp_path, capsys):
    workdir, result, _, _ = base_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    again = loop.train(smoke_config(), copy)
    assert again.step == 8
    for k, v in result.eval.items():
        np.testing.assert_allclose(again.eval[k], v, **EXACT)
    records = metrics.read_metrics(copy)
    assert len(records) == len(metrics.read_metrics(workdir))  # the step-8 eval record is replaced, not repeated
    assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
    out = capsys.readouterr().out
    assert "resuming from step 8" in out and "final held-out eval at step 8" in out
    assert os.path.join(copy, "metrics.png") in out


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.NonFiniteError, match=r"non-finite training metrics at step 6: param_norm=nan") as err:
        loop.train(smoke_config(inject_nan_at_step=6), workdir)
    assert "last good checkpoint: step 4" in str(err.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    params = saved_params(workdir, 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    # The run stopped at step 6 and logged it; the loss of step 6 (computed before the poisoned update) is finite.
    train = [r for r in metrics.read_metrics(workdir) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert train[-1]["param_norm"] == "nan" and math.isfinite(train[-1]["loss"])


def _corrupt(step_dir):
    """Truncate the array data files of the checkpoint to half their size."""
    files = glob.glob(os.path.join(step_dir, "model", "**", "d", "*"), recursive=True)
    assert files
    for f in files:
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(base_run, tmp_path, capfd, monkeypatch):
    base, _, losses, final = base_run
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    _corrupt(os.path.join(ckpt_dir, "8"))

    unraisable = []  # what Python would print as "Exception ignored ..." tracebacks
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    capfd.readouterr()
    with pytest.warns(ckpt_lib.CheckpointFallbackWarning, match="checkpoint step 8 .* resumed from step 4"):
        result = loop.train(smoke_config(), workdir)
    assert result.step == 8
    # Quietly: the one warning, not dozens of "Event loop is closed" tracebacks from the failed restore.
    out, err = capfd.readouterr()
    assert "Event loop is closed" not in out + err and "Traceback" not in out + err
    assert not unraisable
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))[0].startswith("8-")
    # Steps 5..8 ran again from step 4 with the restored data iterator: the same losses, the same parameters.
    again = train_losses(workdir)
    assert sorted(again) == list(range(1, 9))
    np.testing.assert_allclose([again[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], **EXACT)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **EXACT), saved_params(workdir, 8), final)

    # When no checkpoint can be read at all, the trainer refuses to start over and moves nothing.
    for step in os.listdir(ckpt_dir):
        _corrupt(os.path.join(ckpt_dir, step))
    with pytest.raises(RuntimeError, match="no checkpoint .* could be restored"):
        loop.train(smoke_config(), workdir)
    assert sorted(os.listdir(ckpt_dir)) == ["4", "8"]
    out, err = capfd.readouterr()
    assert "Event loop is closed" not in out + err and not unraisable


# ---- crash paths of the run directory ---------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_skipped_with_a_warning_naming_the_file(base_run, tmp_path):
    """Power loss mid-write leaves half a JSON line at the end of metrics.jsonl; the rerun still resumes."""
    workdir, result, _, _ = base_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    path = os.path.join(copy, metrics.METRICS_FILE)
    with open(path, "a") as f:
        f.write('{"step": 9, "spl')
    with pytest.warns(UserWarning, match=re.escape(path) + ".*torn last line") as record:
        again = loop.train(smoke_config(), copy)
    assert any(w.category is metrics.TornMetricsWarning for w in record)
    assert again.step == 8 and again.eval["answer_correct"] == result.eval["answer_correct"]
    with open(path) as f:
        text = f.read()
    assert text.endswith("\n") and '"step": 9' not in text  # the rewrite on resume dropped the torn line
    assert [r["step"] for r in metrics.read_metrics(copy) if r["split"] == "train"] == list(range(1, 9))


def test_a_corrupt_middle_metrics_line_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n')
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": line 2 is not a JSON record"):
        metrics.read_metrics(tmp_path)


class _Crash(Exception):
    pass


def test_the_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    """The process dies while the writer rewrites metrics.jsonl: the file still holds the whole old history."""
    path = tmp_path / metrics.METRICS_FILE
    old = "".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n" for s in range(1, 5))
    path.write_text(old)
    real_dumps, calls = json.dumps, []

    def dies_on_the_third_record(obj, *args, **kwargs):
        calls.append(obj)
        if len(calls) == 3:
            raise _Crash
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(metrics.json, "dumps", dies_on_the_third_record)
    with pytest.raises(_Crash):
        metrics.MetricsWriter(tmp_path, resume_step=4)
    monkeypatch.undo()
    assert path.read_text() == old


def test_a_rerun_whose_config_cannot_restore_leaves_config_json_alone(base_run, tmp_path):
    """A changed model cannot restore the run's checkpoints: the rerun fails and the run stays usable."""
    workdir, result, _, _ = base_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    config_path = os.path.join(copy, loop.CONFIG_FILE)
    with open(config_path) as f:
        before = f.read()
    with pytest.raises(RuntimeError, match="no checkpoint .* could be restored"):
        loop.train(smoke_config(model__d_model=32), copy)
    with open(config_path) as f:
        assert f.read() == before
    evaluated = workdir_lib.evaluate_workdir(copy)
    assert evaluated["step"] == 8 and evaluated["answer_correct"] == result.eval["answer_correct"]


def test_the_first_batch_token_ids_are_checked_before_the_step_compiles(tmp_path, monkeypatch):
    make_datasets = loop.make_datasets

    def with_id(batch, token=32):  # the smoke model's vocab_size is 32
        inputs = batch["inputs"].copy()
        inputs[0, 0] = token
        return batch | {"inputs": inputs}

    def one_id_too_large(cfg):
        train, eval_ = make_datasets(cfg)
        return train.map(with_id), eval_

    def never(*args, **kwargs):
        raise AssertionError("the update step ran on an unchecked batch")

    monkeypatch.setattr(loop, "make_datasets", one_id_too_large)
    monkeypatch.setattr(loop, "train_step", never)
    message = r"first training batch\['inputs'\]: token ids must be in \[0, vocab_size=32\)"
    with pytest.raises(ValueError, match=message):
        loop.train(smoke_config(), str(tmp_path / "run"))


def test_gradient_accumulation_gives_the_same_updates(base_run, tmp_path):
    _, base, losses, _ = base_run
    result = loop.train(smoke_config(optim__grad_accum_steps=2), str(tmp_path))
    accumulated = train_losses(str(tmp_path))
    np.testing.assert_allclose([accumulated[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], **F32_OP)
    np.testing.assert_allclose(result.eval["loss"], base.eval["loss"], **F32_OP)


def test_text_run_reports_bits_per_byte(tmp_path):
    workdir = str(tmp_path / "text")
    result = loop.train(smoke_config(TEXT, num_steps=2, eval_every=0, checkpoint_every=0), workdir)
    # Independent count of the scored bytes of the same eval batches (host-side, lcjax.data.count_bytes).
    cfg = smoke_config(TEXT)
    _, eval_ds = loop.make_datasets(cfg)
    batches = [b for _, b in zip(range(cfg.eval_batches), eval_ds)]
    n_bytes = sum(data_lib.count_bytes(b["targets"], b["loss_mask"]) for b in batches)
    n_tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    expected = data_lib.bits_per_byte(result.eval["loss"], tokens_per_byte=n_tokens / n_bytes)
    np.testing.assert_allclose(result.eval["bits_per_byte"], expected, rtol=1e-12)
    assert math.isfinite(result.eval["bits_per_byte"])


# ---- the 8-device CPU mesh -------------------------------------------------------------------------------------
MESHES = {"dp": dict(data=8), "fsdp": dict(data=2, fsdp=4), "fsdp_tp": dict(data=1, fsdp=4, tensor=2)}


def sharded_config(preset):
    mesh = dict(data=1, fsdp=1, context=1, tensor=1, num_devices=8) | MESHES[preset]
    return smoke_config(sharding=preset, **{f"mesh__{k}": v for k, v in mesh.items()})


@pytest.mark.slow  # an 8-device SPMD compile per preset
@pytest.mark.parametrize("preset", sorted(MESHES))
def test_sharded_training_matches_one_device(preset, base_run, tmp_path):
    """The same loss curve and held-out eval on 8 devices as on one (F32_SHARDED: collectives reorder sums)."""
    _, base, losses, _ = base_run
    result = loop.train(sharded_config(preset), str(tmp_path))
    sharded = train_losses(str(tmp_path))
    np.testing.assert_allclose([sharded[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], **F32_SHARDED)
    np.testing.assert_allclose(result.eval["loss"], base.eval["loss"], **F32_SHARDED)
    assert result.eval["answer_correct"] == base.eval["answer_correct"]


@pytest.mark.slow  # an 8-device SPMD compile
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_context_parallel_training_with_a_balanced_layout_matches_one_device(layout, base_run, tmp_path):
    """Ring attention over context=4 x data=2 with the batch permuted on the host gives the same curve and eval."""
    _, base, losses, _ = base_run
    mesh = {f"mesh__{k}": v for k, v in dict(data=2, fsdp=1, context=4, tensor=1, num_devices=8).items()}
    c = smoke_config(sharding="context_parallel", context_layout=layout, model__context_impl="ring", **mesh)
    result = loop.train(c, str(tmp_path))
    sharded = train_losses(str(tmp_path))
    np.testing.assert_allclose([sharded[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], **F32_SHARDED)
    assert result.eval["answer_correct"] == base.eval["answer_correct"]


def test_recurrent_blocks_refuse_a_permuted_layout():
    c = smoke_config()
    hybrid = {"model.block_pattern": ("attention", "m2"), "model.n_layers": 2,
              "model.mixers": dict(m2=dict(d_model=c.model.d_model, l_max=c.model.max_seq_len))}  # fmt: skip
    with pytest.raises(ValueError, match="config.context_layout"):
        config_lib.override(c, hybrid | {"context_layout": "zigzag"})


def test_train_state_is_born_sharded():
    """What the fsdp_tp run above builds: parameters and Adam moments sharded over fsdp x tensor from the start."""
    cfg = sharded_config("fsdp_tp")
    mesh = state.build_mesh(cfg.mesh)
    _, tx = state.optimizer_for(cfg)
    model, optimizer = state.create_train_state(cfg, tx, mesh, cfg.rules)
    assert tuple(jax.typeof(model.lm_head[...]).sharding.spec) == ("fsdp", "tensor")
    assert tuple(jax.typeof(model.embed_tokens.weight[...]).sharding.spec) == ("tensor", "fsdp")
    mu = optimizer.opt_state[1][0].mu["lm_head"]  # clip_by_global_norm, then adamw's scale_by_adam state
    assert tuple(jax.typeof(mu[...]).sharding.spec) == ("fsdp", "tensor")
