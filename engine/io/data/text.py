"""Text as token ids for language models: windows of a token stream, y = x shifted by one.

Keys: x [N, length] int32 and y [N, length] int32 (y[:, t] is the token after x[:, t]).
Token ids index the vocabulary, the sorted unique tokens of the whole text; map ids back to
text with :func:`vocabulary`; a spec writes its size as ``vocab`` (``num: vocab``, ``out:
vocab``), counted when the spec is loaded (:func:`bind_vocab`). ``level: char`` makes every
character a token; ``level: word`` makes every word (``\\w+``) and every punctuation mark a
token (whitespace is dropped).

The built-in corpus (``corpus.txt``) is the opening of Shakespeare's *Coriolanus* (public
domain), as in the well-known "tiny shakespeare" data set.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from dlgraph.engine.errors import DataError, Source, SpecError
from dlgraph.engine.io.data.base import (
    MAX_TEXT_BYTES,
    Arrays,
    DataSource,
    check_budget,
    check_regular,
    fail,
    path_field,
    resolve,
    samples_field,
    source_field,
)

CORPUS = Path(__file__).with_name("corpus.txt")


class TextTokens(DataSource):
    """Windows of token ids of a text (the built-in corpus unless `path` is given)."""

    source: Literal["text_tokens"] = source_field("text_tokens")
    example = ({"length": 20}, {"x": (60, 20), "y": (60, 20)})  # its test
    path: str | None = path_field("A UTF-8 text file; by default the built-in corpus "
                                  "(Shakespeare). Relative paths are resolved against the "
                                  "spec's folder.", default=None)
    level: Literal["char", "word"] = Field("char", description="Tokens are characters or words.")
    length: int = Field(64, ge=1, description="Context length: tokens per window.")
    samples: int = samples_field()

    def scratch_bytes(self) -> float:  # int64 window indices and the int32 windows
        return 12.0 * self.samples * (self.length + 1)

    def load(self, base_dir: Path, rng: np.random.Generator) -> Arrays:
        path, ids, _ = _tokenize(self, base_dir)
        if len(ids) <= self.length:
            raise fail(path, f"the text has {len(ids)} tokens; a window of length "
                             f"{self.length} needs {self.length + 1}",
                       help="use a longer text or a smaller length")
        start = rng.integers(0, len(ids) - self.length, size=self.samples)
        windows = ids[start[:, None] + np.arange(self.length + 1)]
        return {"x": windows[:, :-1], "y": windows[:, 1:]}


class Text(TextTokens):
    """Windows of token ids of a text file, for language models."""

    source: Literal["text"] = source_field("text")
    example = None          # it reads a user's file: tested in tests/test_data.py
    path: str = path_field("A UTF-8 text file; relative paths are resolved against the "
                           "spec's folder.")


def vocabulary(spec: TextTokens, base_dir: Path | str = ".") -> list[str]:
    """The tokens that the ids of a ``text``/``text_tokens`` spec stand for: id i -> [i]."""
    if not isinstance(spec, TextTokens):
        raise DataError(f"source '{spec.source}' has no vocabulary",
                        help="only the text and text_tokens sources have one")
    return _tokenize(spec, Path(base_dir))[2]


def _tokenize(spec: TextTokens, base_dir: Path) -> tuple[Path, np.ndarray, list[str]]:
    """The text's path, its token ids (int32) and its vocabulary (sorted unique tokens)."""
    path = resolve(base_dir, spec.path) if spec.path else CORPUS
    size = check_regular(path, limit=MAX_TEXT_BYTES)
    check_budget("tokenising this text", 16.0 * size, path,    # code points, ids, the text
                 "use a shorter text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise fail(path, "the file is not UTF-8 text", help="save it as UTF-8") from None
    ids, vocab = _char_ids(text) if spec.level == "char" else _word_ids(text)
    if not len(ids):
        raise fail(path, "the text is empty", help="point path at a file with some text")
    return path, ids, vocab


def _char_ids(text: str) -> tuple[np.ndarray, list[str]]:
    """Character ids by a table over code points: about 12 bytes a character at the peak.
    (A list of one-character strings took ~60 bytes each, 2 GiB for 58 MiB of CJK text.)"""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    seen = np.zeros(0x110000, bool)
    seen[points] = True
    chars = np.flatnonzero(seen)
    table = np.zeros(0x110000, np.int32)
    table[chars] = np.arange(len(chars), dtype=np.int32)
    return table[points], [chr(c) for c in chars]


def _word_ids(text: str) -> tuple[np.ndarray, list[str]]:
    """Word ids in one pass (a dict of the distinct words, an int32 array of the stream),
    then renumbered in sorted order; no array as wide as the longest word times their
    number is ever made."""
    first: dict[str, int] = {}
    stream = np.fromiter((first.setdefault(m.group(), len(first))
                          for m in re.finditer(r"\w+|[^\w\s]", text)), np.int32)
    vocab = sorted(first)
    order = np.empty(len(first), np.int32)
    order[[first[w] for w in vocab]] = np.arange(len(vocab), dtype=np.int32)
    return order[stream], vocab


#: the word a spec writes for the vocabulary size of its text source (``num: vocab``)
VOCAB = "vocab"
_REFERENCES = ("in", "op", "as", "share", "body")     # fields that name nodes, not sizes


def bind_vocab(data: Any, lines: dict, file: str, base: Path | None = None) -> Any:
    """``data`` (a spec as plain data) with every ``vocab`` in its nodes' fields and its
    inputs' shapes replaced by the vocabulary size of its ``text``/``text_tokens`` source,
    so that ``{op: embedding, num: vocab}`` and ``{op: linear, out: vocab}`` need no count.

    The text is read only when the spec says ``vocab``; a spec that says it without a text
    source gets a located SpecError."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        return data
    found = [(("nodes", nid) + path) for nid, nd in data["nodes"].items()
             for path in _vocab_paths(nd, ())]
    inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
    found += [("inputs", name, "shape", k) for name, t in inputs.items()
              if isinstance(t, dict) and isinstance(t.get("shape"), list)
              for k, d in enumerate(t["shape"]) if d == VOCAB]
    if not found:
        return data
    size = _vocab_size(data, lines, file, base, found[0])
    out = copy.deepcopy(data)
    for path in found:
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = size
    return out


def _vocab_paths(value: Any, path: tuple) -> list[tuple]:
    if value == VOCAB and path and path[-1] not in _REFERENCES:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() if k not in _REFERENCES
                for p in _vocab_paths(v, path + (k,))]
    if isinstance(value, list):
        return [p for k, v in enumerate(value) for p in _vocab_paths(v, path + (k,))]
    return []


def _vocab_size(data: dict, lines: dict, file: str, base: Path | None, first: tuple) -> int:
    src = (data.get("train") or {}).get("data") if isinstance(data.get("train"), dict) else None
    name = src.get("source") if isinstance(src, dict) else None
    if name not in ("text", "text_tokens"):
        raise SpecError(f"'{VOCAB}' is the vocabulary size of a text data source, and this "
                        f"spec's data is {repr(name) if name else 'not given'}",
                        source=Source(file, _line(lines, first)),
                        help="write the size as a number, or train on `source: text` / "
                             "`text_tokens`")
    try:
        spec = (Text if name == "text" else TextTokens).model_validate(src)
    except ValidationError as e:
        raise SpecError(f"bad data spec: {e.errors()[0]['msg']}",
                        source=Source(file, _line(lines, ("train", "data")))) from None
    folder = base if base is not None else (
        Path(file).parent if not file.startswith("<") else Path.cwd())
    return len(_tokenize(spec, folder)[2])


def _line(lines: dict, path: tuple) -> int | None:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None
