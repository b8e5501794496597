"""Optimizers tinygrad lacks, written on its ``Optimizer`` base as its own are: ``_step``
returns each parameter's update (subtracted by the base) and the state tensors to realise.
They follow PyTorch's ``torch.optim.RMSprop`` and ``torch.optim.Adagrad`` step for step
(tests/test_tables.py holds every optimizer record against its PyTorch counterpart).
"""

from __future__ import annotations

from tinygrad import Tensor
from tinygrad.nn import optim


class RMSprop(optim.Optimizer):
    """v = alpha v + (1 - alpha) g^2; step g / (sqrt(v) + eps), through a momentum buffer
    when ``momentum`` > 0; ``centered`` divides by the variance (v minus the mean squared).

    >>> opt = RMSprop([w], lr=0.01)                                   # doctest: +SKIP
    """

    def __init__(self, params: list[Tensor], lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False):
        super().__init__(params, lr)
        self.alpha, self.eps, self.wd = alpha, eps, weight_decay
        self.momentum, self.centered = momentum, centered
        self.v = self._new_optim_param()
        self.buf = self._new_optim_param() if momentum else []
        self.mean = self._new_optim_param() if centered else []

    def _step(self, params: list[Tensor], grads: list[Tensor]):
        ret = []
        for i, (t, g) in enumerate(zip(params, grads, strict=True)):
            if self.wd:
                g = g + self.wd * t.detach()
            self.v[i].assign(self.alpha * self.v[i] + (1 - self.alpha) * g * g)
            var = self.v[i]
            if self.centered:
                self.mean[i].assign(self.alpha * self.mean[i] + (1 - self.alpha) * g)
                var = var - self.mean[i] * self.mean[i]
            up = g / (var.sqrt() + self.eps)
            if self.momentum:
                self.buf[i].assign(self.momentum * self.buf[i] + up)
                up = self.buf[i]
            ret.append((self.lr * up).cast(t.dtype))
        return ret, self.v + self.buf + self.mean


class Adagrad(optim.Optimizer):
    """s = s + g^2 (from ``initial_accumulator_value``); step lr g / (sqrt(s) + eps).

    >>> opt = Adagrad([w], lr=0.01)                                   # doctest: +SKIP
    """

    def __init__(self, params: list[Tensor], lr=0.01, eps=1e-10, weight_decay=0.0,
                 initial_accumulator_value=0.0):
        super().__init__(params, lr)
        self.eps, self.wd, self.start = eps, weight_decay, initial_accumulator_value
        self.sum = self._new_optim_param()

    def _step(self, params: list[Tensor], grads: list[Tensor]):
        ret = []
        for i, (t, g) in enumerate(zip(params, grads, strict=True)):
            if self.wd:
                g = g + self.wd * t.detach()
            self.sum[i].assign(self.sum[i] + g * g)
            # the accumulator starts at zero and the start value is added here: the same
            # sum, with state a checkpoint can hold as zeros
            ret.append((self.lr * g / ((self.sum[i] + self.start).sqrt() + self.eps))
                       .cast(t.dtype))
        return ret, self.sum
