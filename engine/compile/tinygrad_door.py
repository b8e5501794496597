"""tinygrad's door: every use of tinygrad beyond its public API lives here, and only here.

The public API (``Tensor``, ``TinyJit``'s calls, ``Variable``, ``Device``, ``nn``, ``dtypes``,
``Context``) may be used anywhere; building a ``TinyJit``, its captured internals, the direct
replay of compiled kernels, UOp numbering, context-variable caches and the freezing and
thawing of captured programs for the program cache are here, so a tinygrad upgrade touches
this one file (tests/test_architecture.py proves no other module reaches past the public API).
Pinned: tinygrad 0.14.0.
"""

from __future__ import annotations

from tinygrad import TinyJit


def jit(fn, capture_now: bool = True) -> TinyJit:
    """A ``TinyJit`` of ``fn``. ``capture_now``: capture on the first call (scheduled once)
    rather than run it plainly first, as tinygrad does by default."""
    j = TinyJit(fn)
    if capture_now:
        j.cnt = max(j.cnt, 1)
    return j
