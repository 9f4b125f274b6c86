"""The one argument-checking idiom of lcjax: small ``require_*`` checkers used by every config and public function.

Each checker names the parameter in its message and says what is allowed. A value of the wrong Python type raises
``TypeError`` (``True`` is not an int, ``"no"`` is not a bool); a value of the right type outside the allowed set
raises ``ValueError``. Checkers return the value (normalised where said), so a config can write
``n = require_int("LMConfig.d_model", d_model, min=1)``.

Token ids are checked by ``check_token_ids`` whenever the ids are concrete (eager calls, ``generate``, the CLI, the
data pipeline, the trainer's first batch). Under a plain ``jax.jit`` the ids are tracers and cannot be inspected:
an out-of-range id is then clamped by the embedding gather (JAX's documented gather semantics), exactly as in
``jnp.take``. To check under jit, wrap the function with ``lcjax.checks.checkify`` (``jax.experimental.checkify``
with user checks): the same range test is staged into the computation and ``err.throw()`` raises it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify as _checkify


def _type_name(value: Any) -> str:
    return type(value).__name__


def require_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """``value`` as a Python int (numpy integers accepted; bool and float rejected) within ``[min, max]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({_type_name(value)})")
    value = int(value)
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name}={value} is out of range; allowed: {_range_text(min, max)}")
    return value


def require_optional_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int | None:
    """``None``, or ``require_int(name, value, min=min, max=max)``."""
    return None if value is None else require_int(name, value, min=min, max=max)


def require_float(
    name: str, value: Any, *, min: float | int | None = None, max: float | int | None = None, min_open: bool = False,
    max_open: bool = False,
) -> float:  # fmt: skip
    """``value`` as a finite Python float (ints accepted; bool and NaN/inf rejected) within the given bounds.

    ``min_open``/``max_open`` exclude the bound itself (``min=0, min_open=True`` means ``> 0``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({_type_name(value)})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    low_bad = min is not None and (value <= min if min_open else value < min)
    high_bad = max is not None and (value >= max if max_open else value > max)
    if low_bad or high_bad:
        lo = "" if min is None else (f"> {min}" if min_open else f">= {min}")
        hi = "" if max is None else (f"< {max}" if max_open else f"<= {max}")
        raise ValueError(f"{name}={value} is out of range; allowed: {' and '.join(s for s in (lo, hi) if s)}")
    return value


def require_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``numpy.bool_`` accepted); ``0``, ``"no"`` and other truthy stand-ins are not."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({_type_name(value)})")
    return bool(value)


def require_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared with ``==``; bools never stand in for ints)."""
    for c in choices:
        if value == c and isinstance(value, bool) == isinstance(c, bool):
            return value
    raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(repr(c) for c in choices)}")


def require_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r} ({_type_name(value)})")
    return value


def require(cond: bool, message: str) -> None:
    """``ValueError(message)`` unless ``cond``: for the checks no typed checker covers (shapes, relations)."""
    if not cond:
        raise ValueError(message)


def validated_by(check: Callable[..., Any]) -> Callable[[Callable], Callable]:
    """Decorator: run ``check(*args, **kwargs)`` before the function, so that its ValueError comes first.

    For public functions with jaxtyping shape annotations: the runtime shape check (the test suite's import hook)
    would otherwise report a bad input as a type error naming no argument.
    """

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            check(*args, **kwargs)
            return f(*args, **kwargs)

        return wrapper

    return decorate


def _range_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo} <= value <= {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


# ---- token ids ------------------------------------------------------------------------------------------------
_STAGE_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("lcjax_stage_checks", default=False)


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values now (not a tracer under jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_token_ids(name: str, ids: Any, vocab_size: int) -> None:
    """Every id in ``ids`` is in ``[0, vocab_size)``; ``ValueError`` naming ``name`` otherwise.

    Concrete ids are checked now. Traced ids are checked only inside ``checkify`` (below); under a plain jit they
    pass unchecked (an out-of-range id is clamped by the gather, as ``jnp.take`` documents).
    """
    if is_concrete(ids):
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            bad = arr[(arr < 0) | (arr >= vocab_size)]
            raise ValueError(
                f"{name}: token ids must be in [0, vocab_size={vocab_size}); got {bad.size} outside it "
                f"(min {arr.min()}, max {arr.max()})"
            )
    elif _STAGE_CHECKS.get():
        ids = jnp.asarray(ids)
        _checkify.check(
            jnp.all((ids >= 0) & (ids < vocab_size)),
            f"{name}: token ids must be in [0, vocab_size={vocab_size}); got min {{lo}}, max {{hi}}",
            lo=jnp.min(ids), hi=jnp.max(ids),
        )


@contextlib.contextmanager
def _staging() -> Iterator[None]:
    token = _STAGE_CHECKS.set(True)
    try:
        yield
    finally:
        _STAGE_CHECKS.reset(token)


def checkify(fun: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """``fun`` with lcjax's traced checks staged in: returns ``(err, out)``; call ``err.throw()`` to raise.

    ``jax.jit(checks.checkify(loss_fn))(model, tokens)`` checks token ids inside the compiled computation (a few
    reductions per call). It is ``jax.experimental.checkify.checkify`` with user checks.
    """

    @functools.wraps(fun)
    def staged(*args, **kwargs):
        with _staging():
            return fun(*args, **kwargs)

    return _checkify.checkify(staged, errors=_checkify.user_checks)


__all__ = [
    "check_token_ids", "checkify", "is_concrete", "require", "require_bool", "require_choice", "require_float",
    "require_int", "require_optional_int", "require_str", "validated_by",
]  # fmt: skip
