"""`dlgraph sample`: generate text from a trained language model of a text data source."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlgraph.engine.compile.model import Model
from dlgraph.engine.errors import DataError, Source, SpecError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import vocabulary
from dlgraph.engine.io.data.text import TextTokens


def sample(graph: Graph, model: Model, *, prompt: str = "", length: int = 200,
           temperature: float = 0.8, seed: int = 0) -> str:
    """Continue ``prompt`` by ``length`` tokens, sampling the model's next-token logits.

    The spec's input is a window of token ids [batch, T] and its first output the logits
    [batch, T, vocab] (an LSTM or a causal transformer): the window slides over the text.
    With a symbolic length ([batch, time]) each step feeds the context as long as it is
    (up to ``dims: {time: {max: N}}``, else the training windows' length): one compiled
    program serves every step.
    """
    train = graph.spec.train if graph.spec is not None else None
    if train is None or not isinstance(train.data, TextTokens):
        raise SpecError("sample needs a spec trained on a text source (text or text_tokens)",
                        source=Source(graph.source))
    vocab = vocabulary(train.data, graph.base or Path.cwd())
    level = train.data.level
    (name, t), = [(k, v) for k, v in graph.inputs.items() if v.dtype == "int32"][:1] or [
        (None, None)]
    if name is None or t.rank != 2:
        raise SpecError("sample needs one int32 input of shape [batch, T] or [batch, time]",
                        source=Source(graph.source))
    symbolic = isinstance(t.shape[1], str)     # then each step feeds the context as it is
    window = t.shape[1] if not symbolic else graph.spec.dims[t.shape[1]].max \
        if t.shape[1] in graph.spec.dims else train.data.length
    if symbolic:
        model.reserve(**{t.shape[1]: window})
    out = next(iter(graph.outputs))
    index = {tok: i for i, tok in enumerate(vocab)}
    tokens = list(prompt) if level == "char" else prompt.split()
    unknown = [tok for tok in tokens if tok not in index]
    if unknown:
        raise DataError(f"the prompt has tokens the model never saw: {unknown[:5]}",
                        help="use characters (or words) of the training text")
    ids = [index[tok] for tok in tokens] or [int(np.random.default_rng(seed).integers(
        len(vocab)))]
    rng = np.random.default_rng(seed)
    for _ in range(length):
        ctx = ids[-window:]
        pos = len(ctx) - 1
        x = np.zeros((1, len(ctx) if symbolic else window), np.int32)
        x[0, :len(ctx)] = ctx           # causal models ignore what follows position `pos`
        logits = model(**{name: x})[out][0, pos].astype(np.float64)
        if logits.shape[-1] != len(vocab):
            raise SpecError(f"output '{out}' has {logits.shape[-1]} classes but the text has "
                            f"{len(vocab)} tokens", source=Source(graph.source))
        p = np.exp((logits - logits.max()) / max(temperature, 1e-6))
        ids.append(int(rng.choice(len(vocab), p=p / p.sum())))
    sep = "" if level == "char" else " "
    return sep.join(vocab[i] for i in ids)
