"""SamplingParams, and the per-row settings the sampling kernels read.

Drawing happens on the device for every row of a step at once (``pagemem.kernels.sample``:
greedy, temperature, top-k, top-p, min-p); only the chosen ids, and the log-probabilities a
request asks for, come back to the host. Randomness is counter-based: a row's draw depends only
on its request's seed and the position of the token drawn, so a seeded request gives the same
tokens alone or in any batch, on every run. An unseeded request's seed comes from the engine's
seed and the request's id (``request_seed``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from pagemem.kernels import MAX_LOGPROBS, pack_sampling_params

SEED_LIMIT = 2 ** 64


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    temperature 0 is greedy. top_k 0, top_p 1.0 and min_p 0.0 disable those filters (semantics:
    pagemem/kernels/reference_sampling.py). Generation stops after ``max_tokens`` new tokens, on
    a token in ``stop_token_ids``, or on EOS unless ``ignore_eos``. ``seed`` (an int in
    [0, 2**64)) makes the draws reproducible; ``logprobs=N`` (0..20) reports each generated
    token's log-probability and the N most likely, after temperature and before the filters.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_p: float = 0.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(f"SamplingParams.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"SamplingParams.{name} must be finite, got {value!r}")
        for name in ("top_k", "max_tokens"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"SamplingParams.{name} must be an int, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_k >= 2 ** 31:
            raise ValueError(f"SamplingParams.top_k must be < 2**31, got {self.top_k}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise TypeError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
            if not 0 <= self.seed < SEED_LIMIT:
                raise ValueError(f"SamplingParams.seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None:
            if not _is_int(self.logprobs):
                raise TypeError(f"SamplingParams.logprobs must be an int or None, got {self.logprobs!r}")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"SamplingParams.logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise TypeError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _token_ids(ids) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray, set, frozenset)):
        raise TypeError(f"SamplingParams.stop_token_ids must be a sequence of ints, got {ids!r}")
    out = []
    for t in ids:
        if not _is_int(t):
            raise TypeError(f"SamplingParams.stop_token_ids must hold ints, got {t!r}")
        if t < 0:
            raise ValueError(f"SamplingParams.stop_token_ids must be >= 0, got {t}")
        out.append(int(t))
    return tuple(out)


def request_seed(params: SamplingParams, engine_seed: int, request_id: int) -> int:
    """The request's own seed, else one mixed from the engine's seed and the request id
    (splitmix64's finalizer: nearby ids give unrelated seeds)."""
    if params.seed is not None:
        return int(params.seed)
    x = (int(engine_seed) * 0x9E3779B97F4A7C15 + int(request_id) + 1) % SEED_LIMIT
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % SEED_LIMIT
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % SEED_LIMIT
    return x ^ (x >> 31)


def pack_rows(params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """[NUM_FIELDS, n] int32: each row's settings, seed, and the position of the token it draws."""
    return pack_sampling_params([0.0 if p.is_greedy else p.temperature for p in params],
                                [p.top_k for p in params], [p.top_p for p in params],
                                [p.min_p for p in params], seeds, positions)


def stop_reason(params: SamplingParams, token: int, num_generated: int, eos_token_ids: Sequence[int]) -> str | None:
    """"stop" when ``token`` ends the request (EOS or a stop token), "length" at max_tokens, else None."""
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
