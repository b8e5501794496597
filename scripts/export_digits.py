"""Write scikit-learn's 8x8 handwritten digits to a .npz file that graphs/digits.yaml reads.

The 1,797 digits (UCI "optical recognition of handwritten digits", 16 grey levels) ship
inside the scikit-learn wheel, so nothing is downloaded:

    .venv/bin/pip install scikit-learn           # a test dependency: `make test` has it
    .venv/bin/python scripts/export_digits.py    # -> graphs/data/digits.npz
    .venv/bin/dlgraph run graphs/digits.yaml

The archive holds ``x`` [1797, 1, 8, 8] float32 (pixels scaled from 0..16 to [0, 1]) and
``y`` [1797] int32 (the digit), in scikit-learn's order.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "graphs" / "data" / "digits.npz"


def digits() -> dict[str, np.ndarray]:
    """The digits as the archive holds them."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return {"x": (d.images[:, None] / 16.0).astype(np.float32),
            "y": d.target.astype(np.int32)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT,
                    help=f"the .npz to write (default {DEFAULT.relative_to(ROOT)})")
    opts = ap.parse_args(argv)
    try:
        arrays = digits()
    except ImportError:
        print("error: scikit-learn is not installed; it ships the digits\n"
              "  help: .venv/bin/pip install scikit-learn", file=sys.stderr)
        return 1
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = opts.output.with_name(f".{opts.output.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(opts.output)                  # whole or not at all
    counts = np.bincount(arrays["y"])
    print(f"wrote {opts.output}: x {list(arrays['x'].shape)}, y {list(arrays['y'].shape)} "
          f"({counts.min()}-{counts.max()} per digit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
