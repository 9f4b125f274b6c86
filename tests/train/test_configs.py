"""Experiment configs: variants, command-line overrides, typed validation naming the bad field."""

import dataclasses
import glob
import os
import re

import pytest

from lcjax.models.lm import LMConfig
from lcjax.train import config as config_lib
from lcjax.train import config_io
from lcjax.train.command import parse_flags
from lcjax.train.config import ExperimentConfig, OptimConfig
from lcjax.train.config_io import parse_arg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _is_trainer_config(path):
    """Experiment files for ``lcjax train`` (others, e.g. configs/beacon.py, drive their own scripts)."""
    with open(path) as f:
        doc = f.read().split('"""')[1]
    return re.search(r"lcjax train |-m lcjax\.train ", doc) is not None


CONFIG_FILES = [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))) if _is_trainer_config(p)]
MQAR = os.path.join(ROOT, "configs", "mqar.py")


def _mqar(arg="smoke"):
    return config_io.load_config_file(MQAR, arg)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_every_config_file_validates_and_documents_its_command(path, variant):
    cfg = config_io.load_config_file(path, variant)
    assert isinstance(cfg, ExperimentConfig) and isinstance(cfg.model, LMConfig)
    assert config_lib.config_from_json(config_lib.config_to_json(cfg)) == cfg  # config.json restores it
    with open(path) as f:
        text = f.read()
    assert os.path.basename(path) in text.split('"""')[1], "the docstring gives the command"


def test_the_trainer_configs_are_found():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"default.py", "mqar.py", "text_bytes.py"} <= names


def test_default_config_is_the_mqar_job():
    cfg = config_io.load_config_file(os.path.join(ROOT, "configs", "default.py"))
    assert cfg.data.task.name == "mqar_L64_K4_V64_a0.01_zeros"
    assert cfg.model.block_pattern == ("mamba2",) and cfg.model.mixers["mamba2"].d_state == 64
    assert (cfg.num_steps, cfg.optim.learning_rate) == (1000, 0.02)


def test_parse_arg_types_and_flags():
    a = parse_arg("seq=128, lr=1e-3,smoke,name=x", seq=64, lr=3e-3, smoke=False, name="", random=True)
    assert (a.seq, a.lr, a.smoke, a.name, a.random) == (128, 1e-3, True, "x", True)
    assert isinstance(a.seq, int) and isinstance(a.lr, float)
    assert parse_arg("random=false", random=True).random is False
    with pytest.raises(ValueError, match="unknown key 'sq'"):
        parse_arg("sq=3", seq=64)
    with pytest.raises(ValueError, match="seq='abc' is not a valid int"):
        parse_arg("seq=abc", seq=64)
    with pytest.raises(ValueError, match="'seq' needs a value"):
        parse_arg("seq", seq=64)


def test_variants_reach_the_typed_config():
    cfg = _mqar("seq=128,pairs=8,d=32,heads=4,batch=16,steps=7,lr=1e-3,mesh=fsdp")
    assert (cfg.data.task.seq_len, cfg.data.task.num_kv_pairs) == (128, 8)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.max_seq_len) == (32, 4, 128)
    assert (cfg.batch_size, cfg.num_steps, cfg.optim.learning_rate, cfg.sharding) == (16, 7, 1e-3, "fsdp")


def test_command_line_overrides_parse():
    cfg, workdir, rest = parse_flags([
        "prog", f"--config={MQAR}:smoke", "--workdir=/tmp/x", "--config.optim.learning_rate=0.5",
        "--config.model.d_model=24", "--config.model.block_pattern=('attention', 'attention')",
        "--config.model.n_layers=2",
        "--config.model.n_kv_heads=1", "--config.data.task_args.num_kv_pairs=3", "--config.sharding=fsdp_tp",
    ])  # fmt: skip
    assert workdir == "/tmp/x" and rest == []
    assert cfg.optim.learning_rate == 0.5 and cfg.model.d_model == 24 and cfg.model.n_kv_heads == 1
    assert cfg.model.block_pattern == ("attention", "attention") and cfg.data.task.num_kv_pairs == 3
    assert cfg.sharding == "fsdp_tp"


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.optim.learning_rat=1.0", "optim.learning_rat"),  # unknown key (the config is locked)
        ("--config.num_step=3", "num_step"),
        ("--config.num_steps=many", "config.num_steps"),  # wrong type
    ],
)
def test_bad_command_line_overrides_name_the_key(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_flags(["prog", f"--config={MQAR}:smoke", "--workdir=/tmp/x", override])


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("optim.learning_rat", 1.0, "config.optim.learning_rat"),  # unknown key in a section
        ("bogus", 1, "config.bogus"),  # unknown top-level key
        ("data.task_args.seq_len", -64, "config.data.task_args"),  # negative length
        ("data.task_args.seq_len", 65, "seq_len=65 must be even"),
        ("num_steps", 0, "config.num_steps"),
        ("batch_size", -8, "config.batch_size"),
        ("optim.warmup_steps", -1, "config.optim.warmup_steps"),
        ("optim.grad_accum_steps", 3, "config.batch_size"),  # 8 not divisible by 3
        ("optim.b2", 1.5, "config.optim.b2"),
        ("model.d_model", -4, "LMConfig.d_model"),
        ("model.vocab_size", 16, "config.model.vocab_size"),  # smaller than the task's 32 ids
        ("model.max_seq_len", 8, "config.model.max_seq_len"),  # shorter than the task's 16
        ("model.block_pattern", ("lstm",), "unknown block type 'lstm'"),
        ("model.rope", {"theta": -1.0}, "config.model.rope"),
        ("mesh.tensor", 0, "config.mesh.tensor"),
        ("sharding", "zero3", "config.sharding"),
        ("data.task", "sorting", "config.data.task"),
        ("data.kind", "images", "config.data.kind"),
        ("z_loss", -1.0, "config.z_loss"),
        ("progress_bar", "yes", "config.progress_bar"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(path, value, field):
    d = _mqar().to_dict()
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("(", r"\(")):
        ExperimentConfig.from_dict(d)


def test_batch_not_divisible_by_data_parallel_size_names_the_field():
    cfg = _mqar("batch=12")
    cfg.check_data_parallel(4)
    with pytest.raises(ValueError, match=r"config\.batch_size=12 must be divisible by the data-parallel size 8"):
        cfg.check_data_parallel(8)
    cfg = ExperimentConfig.from_dict(_mqar("batch=16").to_dict() | {"eval_batch_size": 12})
    with pytest.raises(ValueError, match=r"config\.eval_batch_size=12"):
        cfg.check_data_parallel(8)


def test_text_config_requires_files():
    d = config_io.load_config_file(os.path.join(ROOT, "configs", "text_bytes.py"), "smoke").to_dict()
    del d["data"]["train_files"]
    with pytest.raises(ValueError, match=r"config\.data\.train_files: is required"):
        ExperimentConfig.from_dict(d)


def test_config_json_round_trip():
    config = _mqar()
    back = config_lib.config_from_json(config_lib.config_to_json(config))
    assert back == config


def test_a_misspelt_override_is_named_even_after_valid_ones():
    with pytest.raises(ValueError, match=r"^unknown config key 'config\.optim\.learnin_rate'; allowed keys of config"):
        parse_flags(["prog", f"--config={MQAR}:smoke", "--workdir=/tmp/x", "--config.num_steps=3",
                     "--config.optim.learnin_rate=1"])  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown config key 'config\.model\.mixers\.mamba2'"):
        parse_flags(["prog", f"--config={MQAR}:smoke", "--workdir=/tmp/x", "--config.model.mixers.mamba2.d_state=8"])


def test_a_missing_config_file_is_named():
    with pytest.raises(ValueError, match=r"config file 'configs/nope\.py' does not exist"):
        parse_flags(["prog", "--config=configs/nope.py:smoke", "--workdir=/tmp/x"])


def test_overrides_reach_mixers_and_rederive_what_was_left_to_derive():
    cfg, _, _ = parse_flags(["prog", f"--config={MQAR}:smoke,model=mamba2", "--workdir", "/tmp/x",
                             "--config.model.mixers.mamba2.d_state", "32", "--config.progress_bar=false"])  # fmt: skip
    assert cfg.model.mixers["mamba2"].d_state == 32 and cfg.progress_bar is False
    base = _mqar()  # attention, d_model 16, 2 heads: head_dim 8 and n_kv_heads 2 were derived, not given
    wider = config_io.override(base, {"model.d_model": 24, "model.n_heads": 3})
    assert (wider.model.head_dim, wider.model.n_kv_heads) == (8, 3)
    assert config_io.override(base, {"model.n_kv_heads": "1"}, from_text=True).model.n_kv_heads == 1


def test_a_field_carries_its_own_check():
    with pytest.raises(ValueError, match=r"config\.optim\.warmup_steps=-1 is out of range"):
        OptimConfig(warmup_steps=-1)
    with pytest.raises(TypeError, match="progress_bar"):  # the tests' beartype hook may speak first
        dataclasses.replace(_mqar(), progress_bar="yes")
    with pytest.raises(ValueError, match=r"config\.data\.num_train=0 is out of range; allowed: >= 1"):
        config_io.override(_mqar(), {"data.num_train": 0})
