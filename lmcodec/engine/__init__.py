"""The exact integer model (docs/ENGINE.md), in four sub-wings under the engine that runs them.

* ``spec/``   -- the specification: constants, integer-only tables, and the independent int64
  reference the tests hold every backend to;
* ``model/``  -- finding, loading and fingerprinting a model, and its integer weights;
* ``cpu/``    -- the CPU backend: numba kernels, the fused step, the exact GEMM paths;
* ``triton/`` -- the CUDA backend: Triton kernels;
* top level   -- ``engine.py`` (the forward pass and output weights), ``kvcache.py``,
  ``gemma.py`` (Gemma 3's layers on any backend), ``ops_torch.py`` (tensor ops, any device).

Sub-wings import downward only (spec < model < cpu, triton < top; ``tests/test_layout.py``).
Imports nothing of lmcodec's above it but the errors and the cache directory.
"""
