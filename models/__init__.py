"""models: Hugging Face checkpoints (Llama, Qwen2, Mistral, GPT-2) run over the page pool.

This package owns the model side of inference: parsing config.json (``ModelConfig``), loading
safetensors weights onto the device (``models.weights``), the NumPy/CuPy forward pass whose
attention reads and writes K/V through ``kernels`` over a ``pagemem`` pool
(``models.transformer``), sampling (``SamplingParams``), tokenizers, random-weight presets
(``random:<preset>``), and a simple prefill-then-decode ``generate`` loop. It holds no pages of
its own: whoever calls ``Model.forward`` owns the pool and the PagedBatch.
"""
from models.config import ModelConfig
from models.generate import generate
from models.model import Model, load_model
from models.presets import PRESETS
from models.sampling import SamplingParams

__all__ = ["ModelConfig", "Model", "load_model", "SamplingParams", "generate", "PRESETS"]
