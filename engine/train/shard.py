"""Data-parallel training on the devices of one machine, by tinygrad's own sharding.

Parameters and optimizer state are replicated on every device (``Tensor.shard(devices)``),
each batch is split along its first axis (``shard(devices, axis=0)``); a reduction over the
batch (the loss, a weight's gradient) is then reduced across the devices by tinygrad, so the
update is the one a single device makes on the whole batch::

    dlgraph run graphs/mlp.yaml --devices cpu:0,cpu:1
    dlgraph.train(g, devices=["cpu:0", "cpu:1"])
"""

from __future__ import annotations

from collections.abc import Iterable

from tinygrad import Tensor

from dlgraph.engine.compile.device import DEVICES, use_device
from dlgraph.engine.errors import DeviceError, Source, TrainingError
from dlgraph.engine.graph.ir import Graph


def parse_devices(devices: str | Iterable[str]) -> list[str]:
    """``"cpu:0,cpu:1"`` or ``["cpu:0", "cpu:1"]`` -> ``["cpu:0", "cpu:1"]`` (checked).

    >>> parse_devices("cpu:0, cpu:1")
    ['cpu:0', 'cpu:1']
    """
    names = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices)]
    names = [d for d in names if d]
    if not names:
        raise DeviceError("--devices lists no device", help="e.g. --devices cpu:0,cpu:1")
    kinds = set()
    for d in names:
        kind, _, index = d.partition(":")
        if kind.lower() not in DEVICES or (index and not index.isdigit()):
            raise DeviceError(f"unknown device '{d}'",
                              help=f"name devices as KIND:INDEX, KIND one of {', '.join(DEVICES)}"
                                   " (e.g. cpu:0,cpu:1 or cuda:0,cuda:1)")
        kinds.add(kind.lower())
    if len(kinds) > 1:
        raise DeviceError(f"--devices mixes kinds of device ({', '.join(sorted(kinds))})",
                          help="split a batch over devices of one kind, e.g. cuda:0,cuda:1")
    canon = [_canonical(d) for d in names]
    twice = sorted({d for d, c in zip(names, canon, strict=True) if canon.count(c) > 1})
    if twice:
        raise DeviceError(f"device {twice[0]} is listed twice",
                          help="list each device once: --devices cpu:0,cpu:1")
    return names


def _canonical(name: str) -> str:
    kind, _, index = name.partition(":")
    return f"{kind.upper()}:{int(index or 0)}"


def use_devices(devices: str | Iterable[str]) -> tuple[str, ...]:
    """Select the devices' kind as tinygrad's default and open each one; returns tinygrad's
    names (``("CPU:0", "CPU:1")``). An unusable device is a :class:`DeviceError`."""
    names = parse_devices(devices)
    use_device(names[0].partition(":")[0])
    out = tuple(_canonical(d) for d in names)
    for d, shown in zip(out, names, strict=True):
        try:
            Tensor([1.0], device=d).add(1).realize()
        except Exception as e:  # tinygrad raises many kinds; every one means "unusable"
            raise DeviceError(f"cannot open device {shown}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": "),
                              help="list only devices this machine has") from None
    return out


def data_parallel(graph: Graph, batch: int, device: str | None,
                  devices: str | Iterable[str] | None) -> tuple[str, ...]:
    """Training's devices: ``()`` for one (``device`` or tinygrad's default), else the
    devices a batch of ``batch`` is split over, opened and checked."""
    if not devices:
        use_device(device)
        return ()
    devs = use_devices(devices)
    if len(devs) < 2:
        raise DeviceError(f"--devices {devices if isinstance(devices, str) else ','.join(devices)}"
                          " names one device; splitting a batch needs two or more",
                          help="for one device use --device NAME, or list more: cpu:0,cpu:1")
    kind = devs[0].partition(":")[0].lower()
    if device and device.lower() != kind:
        raise DeviceError(f"--device {device} and --devices {kind}:... disagree",
                          help="leave out --device when --devices is given")
    check_split(graph, batch, devs)
    return devs


def check_split(graph: Graph, batch: int, devices: tuple[str, ...]) -> None:
    """A batch split over ``devices`` must be whole, and every input must be batched along its
    first axis by a named dim (the split follows it through the graph)."""
    n = len(devices)
    if batch % n:
        lo, hi = batch - batch % n, batch + n - batch % n
        raise TrainingError(f"batch {batch} does not divide over {n} devices",
                            source=Source(graph.source, graph.lines.get(("train", "batch"))),
                            help=f"use a batch that is a multiple of {n} (e.g. {lo or hi} "
                                 f"or {hi}), or fewer devices")
    fixed = [name for name, t in graph.inputs.items()
             if not t.rank or not isinstance(t.shape[0], str)]
    if fixed:
        t = graph.inputs[fixed[0]]
        raise TrainingError(f"input '{fixed[0]}' has shape {list(t.shape)}: its first axis is "
                            f"not a named batch dim, so the batch cannot be split over devices",
                            source=Source(graph.source, graph.lines.get(("inputs", fixed[0]))),
                            help="declare the batch axis by name, e.g. shape: [batch, ...]")


def replicate(tensors: Iterable[Tensor], devices: tuple[str, ...]) -> None:
    """Copy each tensor onto every device, in place, realised (a lazy copy would be captured
    by a compiled step and re-read from the old buffer on every call)."""
    tensors = [t for t in tensors if devices and not isinstance(t.device, tuple)]
    for t in tensors:
        t.shard_(devices)
    if tensors:
        Tensor.realize(*tensors)


def split_batch(tensors: list[Tensor], devices: tuple[str, ...]) -> list[Tensor]:
    """Each tensor split along its first axis over ``devices`` (none: as it is), realised."""
    if not devices:
        return tensors
    out = [t.shard(devices, axis=0) for t in tensors]
    Tensor.realize(*out)
    return out
