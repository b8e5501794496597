"""`dlgraph gradcheck`: the derived gradients of a user's graph against central finite
differences, both computed in float64.

For each trainable parameter a few coordinates are perturbed by ±eps and the objective
re-evaluated; the worst relative error per parameter is reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit, dtypes

from .errors import Source, SpecError
from .ir import Graph
from .lower import Ctx, Evaluator, bind, init_param, random_inputs, use_device
from .summary import phase_params, training_graph


def _inputs(g: Graph, batch: int, seed: int) -> dict[str, np.ndarray]:
    """A batch from the spec's own data when it has any, else seeded random inputs."""
    train = g.spec.train
    if train is not None:
        from .data import load_data
        from .train import feed_arrays
        arrays = feed_arrays(g, train, load_data(train.data, g.base or Path.cwd(), seed))
        return {k: v[:batch] for k, v in arrays.items()}
    return random_inputs(g, batch, seed)


def gradcheck(g: Graph, *, batch: int = 4, seed: int = 0, device: str | None = None,
              coords: int = 6, eps: float = 1e-6) -> list[tuple[str, float]]:
    """``[(param name, worst relative error)]`` for every trainable parameter of every phase."""
    use_device(device)
    if g.spec is None or g.spec.train is None:
        raise SpecError("gradcheck needs a `train:` section naming the objective",
                        source=Source(g.source))
    arrays = _inputs(g, batch, seed)
    dims = bind(g, arrays)
    feeds = {k: Tensor(v.astype(np.float64) if v.dtype.kind == "f" else v)
             for k, v in arrays.items()}
    base = {n: init_param(p, seed).astype(np.float64) for n, p in g.params.items()}
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, float]] = []
    phases = g.spec.train.all_phases()
    for phase in phases:
        for name, worst in _check_phase(g, phase, feeds, dims, base, seed, coords, eps, rng):
            rows.append((name if len(phases) == 1 else f"{phase.name}: {name}", worst))
    return rows


def _check_phase(g, phase, feeds, dims, base, seed, coords, eps, rng):
    tg = training_graph(g, phase)
    names = phase_params(g, phase)
    objective = Evaluator(g, [tg.objective])
    order = list(base)
    # one compiled program, replayed for every perturbation
    jitted = TinyJit(lambda *ps: objective(Ctx(True, dims), feeds,
                                           dict(zip(order, ps, strict=True)))[0].realize())

    def loss_at(values: dict[str, np.ndarray]) -> float:
        Tensor.manual_seed(seed)
        ps = [Tensor(values[k], dtype=dtypes.float64).realize() for k in order]
        return float(jitted(*ps).numpy())

    Tensor.manual_seed(seed)
    ps = {k: Tensor(v, dtype=dtypes.float64) for k, v in base.items()}
    grads = Evaluator(tg, [tg.grads[n] for n in names])(Ctx(True, dims), feeds, ps)
    for name, grad in zip(names, grads, strict=True):
        ours = grad.numpy()
        worst = 0.0
        for i in rng.choice(ours.size, size=min(coords, ours.size), replace=False):
            idx = np.unravel_index(i, ours.shape)
            plus, minus = dict(base), dict(base)
            plus[name], minus[name] = base[name].copy(), base[name].copy()
            plus[name][idx] += eps
            minus[name][idx] -= eps
            fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
            worst = max(worst, abs(fd - ours[idx]) / max(abs(fd), abs(ours[idx]), 1e-6))
        yield name, worst
