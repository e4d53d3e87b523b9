"""The enclave's built-in model runtimes.

``anymal``: a toy AnyMAL (ViT → Perceiver Resampler → Llama-style LM) that answers questions about
procedurally generated "shapes" scenes (``shapes``), with its word-level ``tokenizer``; ``train``
reproduces the shipped weights in ``weights/`` from a seed.
"""

from enclave.models.anymal import AnyMAL, AnyMALConfig, InvalidRequest, InvalidWeights
from enclave.models.tokenizer import Tokenizer

__all__ = ["AnyMAL", "AnyMALConfig", "InvalidRequest", "InvalidWeights", "Tokenizer"]
