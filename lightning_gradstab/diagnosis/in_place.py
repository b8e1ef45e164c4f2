"""Which calls write a tensor in place, and which tensors they may overwrite.

The probe defers the statistics of the outputs it records and reads them in a few batched reductions; a call
that writes into one of them first (``relu_``, ``x += y``, ``inplace=True``, ``out=``) must be seen before it
runs, so the tracer asks :func:`writes_in_place` of every call and :func:`written_tensors` of the ones that may.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_gradstab.diagnosis.ops import pytree_leaves

_IN_PLACE_DUNDERS = frozenset(
    {
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__imatmul__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__setitem__",
        "__set__",
    }
)
_WRITES_IN_PLACE: dict[Any, int] = {}  # function -> 1: by its name, 2: a torch.nn.functional op, 0: neither
# torch.nn.functional op -> the position of its `inplace` parameter (-1: none; None: unknown)
_INPLACE_POSITION: dict[Any, int | None] = {}


def _in_place_kind(func: Callable) -> int:
    kind = _WRITES_IN_PLACE.get(func)
    if kind is None:
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS:
            kind = 1
        else:
            kind = 2 if getattr(func, "__module__", None) == "torch.nn.functional" else 0
        with contextlib.suppress(TypeError):  # an unhashable callable: decided again next time
            _WRITES_IN_PLACE[func] = kind
    return kind


def writes_in_place(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a call may overwrite one of its tensor arguments: a trailing-underscore op (``relu_``,
    ``copy_``, ``masked_fill_``), an augmented or item assignment (``x += y``, ``x[i] = v``), an ``out=`` or
    ``inplace=True`` argument, or a ``torch.nn.functional`` op given a positional ``True`` (its ``inplace``
    flag, ``F.relu(x, True)``; read conservatively: a spurious yes only costs an early read of the pending
    statistics). The name is looked at once per function."""
    kind = _in_place_kind(func)
    if kind == 1:
        return True
    if kwargs and (kwargs.get("inplace") is True or kwargs.get("out") is not None):
        return True
    return kind == 2 and any(a is True for a in args)


def written_tensors(func: Callable, args: tuple, kwargs: dict) -> list[Any] | None:
    """The tensors a call :func:`writes_in_place` may overwrite: ``[]`` when it writes none, None when they
    cannot be told apart (then any argument may be written).

    An in-place method or augmented/item assignment writes its first argument (``self``), ``out=`` its ``out``,
    ``inplace=True`` (by keyword, or a ``torch.nn.functional`` op's ``inplace`` parameter given a positional
    ``True``) its input; any other positional ``True`` of a ``torch.nn.functional`` op (``F.batch_norm``'s
    ``training``) may write the tensors after the input (running statistics), never the input itself.

    Example::

        written_tensors(torch.Tensor.add_, (x, y), {})            # [x]
        written_tensors(F.batch_norm, (x, mean, var, w, b, True), {})  # [mean, var, w, b]
    """
    kind = _in_place_kind(func)
    targets: list[Any] = []
    if kind == 1:
        if not args:
            return None
        targets += pytree_leaves(args[0])
    if kwargs:
        if kwargs.get("inplace") is True:
            if not args and "input" not in kwargs:
                return None
            targets += pytree_leaves(args[0] if args else kwargs["input"])
        if kwargs.get("out") is not None:
            targets += pytree_leaves(kwargs["out"])
    if kind == 2 and any(a is True for a in args):
        position = _inplace_position(func)
        if position is None:
            return None
        if 0 <= position < len(args) and args[position] is True:
            targets += pytree_leaves(args[0])
        targets += pytree_leaves(args[1:])
    return [t for t in targets if isinstance(t, Tensor)]


def _inplace_position(func: Callable) -> int | None:
    """The position of a ``torch.nn.functional`` op's ``inplace`` parameter (-1 if it has none), None when its
    signature cannot be read or takes ``*args`` (once per function)."""
    try:
        return _INPLACE_POSITION[func]
    except (KeyError, TypeError):
        pass
    position: int | None = -1
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        position = None
    else:
        for index, parameter in enumerate(parameters):
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                position = None
                break
            if parameter.name == "inplace" and parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                position = index
                break
    with contextlib.suppress(TypeError):
        _INPLACE_POSITION[func] = position
    return position
