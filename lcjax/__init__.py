"""lcjax: pure-JAX reference implementations of long-sequence architectures.

Subpackages: ``ops`` (pure functions), ``layers`` (NNX modules), ``models`` (compositions), ``train``, ``data``,
``convert`` (HF <-> lcjax weights); ``sharding`` is the one sharding vocabulary.
"""

__version__ = "0.1.0"
