"""`dlgraph gradcheck`: the derived gradients of a user's graph against central finite
differences, both computed in float64.

For each trainable parameter a few coordinates are perturbed by ±eps and the objective
re-evaluated; the worst relative error per parameter is reported. Coordinates where the
perturbation crosses a kink (the one-sided differences disagree) are skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tinygrad import Tensor, dtypes

from dlgraph.engine.compile.device import use_device
from dlgraph.engine.compile.interpret import Ctx, Interpreter, input_dims
from dlgraph.engine.compile.lower import lower
from dlgraph.engine.errors import Source, SpecError
from dlgraph.engine.graph.autodiff import phase_params, training_graph
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.spec.init import init_param, random_inputs


def _inputs(g: Graph, batch: int, seed: int) -> dict[str, np.ndarray]:
    """A batch from the spec's own data when it has any, else seeded random inputs."""
    train = g.spec.train
    if train is not None and train.data is not None:
        from dlgraph.engine.io.data import load_data
        from dlgraph.engine.train.prepare import feed_arrays
        arrays = feed_arrays(g, train, load_data(train.data, g.base or Path.cwd(), seed))
        return {k: v[:batch] for k, v in arrays.items()}
    return random_inputs(g, batch, seed)


def gradcheck(g: Graph, *, batch: int = 4, seed: int = 0, device: str | None = None,
              coords: int = 6, eps: float = 1e-6) -> list[tuple[str, float, int]]:
    """``[(param name, worst relative error, coordinates skipped at a kink)]`` for every
    trainable parameter of every phase. A coordinate whose perturbation crosses a kink is
    skipped and another one drawn (up to ``4 * coords`` in all)."""
    use_device(device)
    if g.spec is None or g.spec.train is None:
        raise SpecError("gradcheck needs a `train:` section naming the objective",
                        source=Source(g.source))
    arrays = _inputs(g, batch, seed)
    dims = input_dims(g, arrays)
    tensors = {k: Tensor(v.astype(np.float64) if v.dtype.kind == "f" else v).realize()
             for k, v in arrays.items()}
    base = {n: init_param(p, seed).astype(np.float64) for n, p in g.params.items()}
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, float, int]] = []
    phases = g.spec.train.all_phases()
    for phase in phases:
        for name, worst, kinks in _check_phase(g, phase, tensors, dims, base, seed, coords, eps,
                                               rng):
            rows.append((name if len(phases) == 1 else f"{phase.name}: {name}", worst, kinks))
    return rows


def _check_phase(g, phase, tensors, dims, base, seed, coords, eps, rng):
    tg = training_graph(g, phase)
    names = phase_params(g, phase)
    # one compiled program, replayed for every perturbation
    order = list(base)
    objective = lower(g, [tg.objective], params=dict.fromkeys(order), training=True,
                      params_as_inputs=True, inline=True)

    def loss_at(values: dict[str, np.ndarray]) -> float:
        Tensor.manual_seed(seed)
        ps = {k: Tensor(values[k], dtype=dtypes.float64).realize() for k in order}
        return float(objective(tensors, dims, ps)[0].numpy())

    Tensor.manual_seed(seed)
    ps = {k: Tensor(v, dtype=dtypes.float64) for k, v in base.items()}
    grads = Interpreter(tg, [tg.grads[n] for n in names])(Ctx(True, dims), tensors, ps)
    at_base = loss_at(base)
    for name, grad in zip(names, grads, strict=True):
        ours = grad.numpy()
        worst, checked, kinks = 0.0, 0, 0
        for i in rng.permutation(ours.size)[:4 * coords]:
            if checked == coords:
                break
            idx = np.unravel_index(i, ours.shape)
            err = _coordinate_error(loss_at, base, at_base, name, idx, float(ours[idx]), eps)
            if err is None:
                kinks += 1
                continue
            worst, checked = max(worst, err), checked + 1
        yield name, worst, kinks


def _coordinate_error(loss_at, base, at_base, name, idx, ours, eps) -> float | None:
    """Relative error of ``ours`` against the central difference at one coordinate; None
    where the two one-sided differences disagree: the perturbation crossed a kink (relu,
    abs, max, where), so no finite difference is the derivative there."""
    plus, minus = dict(base), dict(base)
    plus[name], minus[name] = base[name].copy(), base[name].copy()
    plus[name][idx] += eps
    minus[name][idx] -= eps
    up, down = loss_at(plus), loss_at(minus)
    right, left = (up - at_base) / eps, (at_base - down) / eps
    scale = max(abs(right), abs(left), 1e-6)
    if abs(right - left) > 1e-3 * scale:
        return None
    fd = (up - down) / (2 * eps)
    return abs(fd - ours) / max(abs(fd), abs(ours), 1e-6)
