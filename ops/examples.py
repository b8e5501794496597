"""The test examples an op's record carries (``register(..., examples=, grad_examples=)``).

Plain data, so that an op and its tests are one record: the registry-wide tests
(``tests/test_ops.py``, ``tests/test_gradients.py``) turn every example into a one-op spec
whose inputs are drawn as described here, and hold the op against its ``reference``.

An example names its inputs in order (:class:`Float`, :class:`Int`, :class:`Bool`; short
names ``F``, ``B``) and the op's attributes; ``E`` is :class:`Example`::

    examples=[E([F((3, 4)), F((4,), "away")]),
              E([F((2, 3))], {"axis": 0}, id="softmax_axis0")]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, eq=False)
class Float:
    """A float32 input of ``shape`` (named dims are sized by the example's ``dims``, else 4).

    ``gen``: normal | pos (0.5..2) | away (|x| >= 0.1) | unit (0..1). ``values`` fixes the
    array; ``diff=False`` keeps it out of the gradient (a frozen ``param`` in gradient specs).
    """

    shape: tuple
    gen: str = "normal"
    values: Any = None
    diff: bool = True


@dataclass(frozen=True, eq=False)
class Int:
    """An int32 input of ids in [0, high)."""

    shape: tuple
    high: int = 3
    values: Any = None


@dataclass(frozen=True, eq=False)
class Bool:
    """A bool input, made in the graph as ``greater(raw, 0)`` from a float input ``raw``.

    ``values`` fixes the bool array.
    """

    shape: tuple
    values: Any = None


INPUTS = (Float, Int, Bool)


@dataclass(frozen=True, eq=False)
class Example:
    """One test of an op: ``op(*ins, **attrs)``; ``id`` names it in the test report (default:
    the op's name) and is unique among the registry's examples of its kind.

    Forward examples compare the output with the op's ``reference`` within ``rtol`` /
    ``atol``; ``keep_init`` keeps the initial parameters instead of drawing new ones.
    Gradient examples compare the gradient with tinygrad's and with finite differences of
    the reference; ``float64`` also runs them in float64, ``fd_training=False`` takes the
    differences in eval mode (where training draws random masks).
    """

    ins: list = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    id: str = ""
    rtol: float = 1e-5
    atol: float = 1e-5
    dims: dict = field(default_factory=dict)    # sizes of named dims in input shapes
    keep_init: bool = False
    extra: dict = field(default_factory=dict)   # more top-level spec fields (modules:)
    float64: bool = False
    fd_training: bool = True


F, B, E = Float, Bool, Example
