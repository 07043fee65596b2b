"""SamplingParams and token sampling: greedy, temperature, top-k, top-p; seeded per request.

Each request owns one ``numpy.random.Generator`` (``make_rng(params)``), so a seeded request
draws the same tokens whatever else is in its batch. Greedy rows take an argmax on the device;
only rows that sample move their logits to the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pagemem.backend import module_of, to_host

Array = Any


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters. Generation stops after
    ``max_tokens`` new tokens, or on a token in ``stop_token_ids``, or on EOS unless ``ignore_eos``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise TypeError(f"SamplingParams.{name} must be a number, got {getattr(self, name)!r}")
        for name in ("top_k", "max_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, np.integer)):
                raise TypeError(f"SamplingParams.{name} must be an int, got {getattr(self, name)!r}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise TypeError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def make_rng(params: SamplingParams) -> np.random.Generator:
    """The request's own generator: reproducible when ``params.seed`` is set."""
    return np.random.default_rng(params.seed)


def filter_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Probabilities [V] float64 after temperature, top-k and top-p (zeros outside the kept set).

    top-k keeps the k largest logits (ties at the k-th value are kept); top-p then keeps the
    smallest set of most likely tokens whose probability reaches top_p.
    """
    z = logits.astype(np.float64) / params.temperature                # [V]
    if 0 < params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]                        # mass strictly before each token
        drop = order[before >= params.top_p]
        p[drop] = 0.0
        p /= p.sum()
    return p


def sample(logits: Array, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One token per row of ``logits`` [n, V] (NumPy or CuPy), row i under params[i] and rngs[i]."""
    n = logits.shape[0]
    if len(params) != n or len(rngs) != n:
        raise ValueError(f"sample: {n} rows of logits but {len(params)} params and {len(rngs)} rngs")
    tokens = to_host(logits.argmax(axis=-1)).astype(np.int64)           # [n]
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        host = to_host(logits[module_of(logits).asarray(rows)] if len(rows) < n else logits)  # [len(rows), V]
        for j, i in enumerate(rows):
            probs = filter_probs(host[j], params[i])
            tokens[i] = rngs[i].choice(probs.shape[0], p=probs)
    return tokens


def stop_reason(params: SamplingParams, token: int, num_generated: int, eos_token_ids: Sequence[int]) -> str | None:
    """"stop" when ``token`` ends the request (EOS or a stop token), "length" at max_tokens, else None."""
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
