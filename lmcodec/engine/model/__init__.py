"""From a model on disk to integer weights: the registry and loader (``registry``: registered
models, GGUF or HF directory -> float weights and a fingerprint), a registered GGUF assembled
from its package's parts (``assembled``), and the quantization to int8 weights with integer
row scales, cached once per model (``quantize``)."""
