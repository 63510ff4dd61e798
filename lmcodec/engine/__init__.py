"""The exact integer model (docs/ENGINE.md): constants, fixed-point math, quantized weights, model
loading, the CPU / tensor / Triton ops, the engine that runs them, and the independent int64
reference the tests hold them to.  Imports nothing of lmcodec's above it but the errors."""
