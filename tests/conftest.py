"""Test setup: 8 fake CPU devices, strict rank promotion, runtime jaxtyping checks on lcjax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)

# Runtime shape checking of every jaxtyping annotation in lcjax (install before lcjax is imported).
from jaxtyping import install_import_hook  # noqa: E402

_hook = install_import_hook("lcjax", "beartype.beartype")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_mesh_leak():
    """Every test starts with no mesh set and leaves none behind."""
    assert jax.sharding.get_abstract_mesh().empty, "a previous test leaked a mesh"
    yield
    assert jax.sharding.get_abstract_mesh().empty, "this test leaked a mesh"


@pytest.fixture
def rng():
    return np.random.default_rng(0)
