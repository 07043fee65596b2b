"""models: Hugging Face checkpoints (Llama, Qwen2, Mistral, GPT-2) run over the page pool.

This package owns the model side of inference: parsing config.json (``ModelConfig``), loading
safetensors weights onto the device (``pagemem.models.weights``), the NumPy/CuPy forward pass whose
attention reads and writes K/V through ``pagemem.kernels`` over a ``pagemem`` pool
(``pagemem.models.transformer``), sampling (``SamplingParams``), tokenizers, random-weight presets
(``random:<preset>``), and ``LLM``, the continuous-batching engine over pagemem's Scheduler
(``pagemem.models.engine``) with its CLI. ``pagemem.models.generate`` is a plain
prefill-then-decode loop that the tests compare the engine with.
The forward pass holds no pages: whoever calls ``Model.forward`` owns the pool and the
PagedBatch (an ``LLM`` owns its pool, host swap and prefix cache).
"""
from pagemem.models.config import ModelConfig
from pagemem.models.engine import LLM, RequestOutput
from pagemem.models.model import Model, load_model
from pagemem.models.presets import PRESETS
from pagemem.models.sampling import SamplingParams

__all__ = ["ModelConfig", "Model", "load_model", "SamplingParams", "PRESETS", "LLM", "RequestOutput"]
