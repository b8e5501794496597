"""The device a program runs on: chosen by name or by tinygrad, probed with one kernel, and
remembered per machine (probing every backend takes about a second)."""

from __future__ import annotations

import os
import shutil

from tinygrad import Device, Tensor

from dlgraph.engine.compile.cache import (
    default_cache,
    kernel_cache,
    remember_device,
    remembered_device,
)
from dlgraph.engine.compile.tinygrad_door import compile_in_process, keep_kernels_in, select_device
from dlgraph.engine.errors import DeviceError

DEVICES = ("cpu", "cuda", "nv", "amd", "metal", "cl", "webgpu")


SERIAL_COMPILE_CORES = 4
"""On machines with at most this many cores, kernels are compiled in this process rather
than in tinygrad's pool of worker processes (``PARALLEL``; set it to choose). Measured on 2
cores (graphs/lstm.yaml, first training step): 5.0-7.9 s serial against 11-16 s with the
pool, and 1.1-1.6 s against 1.6-1.8 s with the program cache: starting the pool's
processes (each imports tinygrad anew) costs more than the parallel compile saves. With two
cores or more, a forked copy of this process (nothing to import) generates half of a
program's new kernels (``DLGRAPH_COMPILE_HELPER=0``: none)."""


def use_device(name: str | None) -> str:
    """Select and probe a tinygrad device; a :class:`DeviceError` says how to fix a failure."""
    if "PARALLEL" not in os.environ and (os.cpu_count() or 1) <= SERIAL_COMPILE_CORES:
        compile_in_process(helper=(os.cpu_count() or 1) >= 2
                           and os.environ.get("DLGRAPH_COMPILE_HELPER", "1") != "0")
    auto = not name and not os.environ.get("DEV")
    if auto and (known := remembered_device()) is not None:
        try:
            return _probe(known)
        except DeviceError:             # the hardware changed under the same fingerprint
            remember_device(None)
            select_device("")
    dev = _probe(name)
    if auto:
        remember_device(dev)
    return dev


def _probe(name: str | None) -> str:
    """Select ``name`` (None: tinygrad's choice) and run one kernel on it."""
    if name:
        if name.lower() not in DEVICES:
            raise DeviceError(f"unknown device '{name}'",
                              help=f"devices: {', '.join(DEVICES)}")
        select_device(name.upper())
    dev = name.upper() if name else "the default device"
    try:
        dev = Device.DEFAULT
        programs = default_cache(warn=lambda s: None)       # before the device is opened
        keep_kernels_in(kernel_cache(programs) if programs is not None else None)
        Tensor([1.0], device=dev).add(1).realize()
    except Exception as e:  # tinygrad raises many kinds; every one means "unusable"
        hint = "install a C compiler for tinygrad's CPU backend: apt-get install clang" \
            if dev.upper().startswith(("CPU", "THE DEFAULT")) and not shutil.which("clang") else \
            f"check the {dev} driver, or pick another with --device cpu"
        raise DeviceError(f"no usable tinygrad device ({dev}): {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": "),
                          help=hint) from None
    return dev
