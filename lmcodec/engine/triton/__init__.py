"""The CUDA backend: the engine's integer steps as Triton kernels (``ops``, the op set; ``attend``,
attention over the int8 KV cache; ``gemma``, Gemma 3's post-norm add and q/k norms; ``ints``,
the integer helpers they share).  Imported only where a CUDA device runs."""
