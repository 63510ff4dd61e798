"""The CPU backend: the engine's integer steps as numba kernels.

``ops`` is the op set the engine calls; ``fused`` runs a decoding step's few rows as one kernel
a layer; ``rows`` holds the per-row helpers both inline; ``attend_gemm`` the parallel pass's
attention on int8 GEMMs; ``int_dots`` and ``value_sums`` the AVX-512 VNNI products (on any
other CPU, plain loops); ``llvm_loop`` the counted loop the intrinsics share; ``jit`` numba's
configuration, which every kernel module imports first.
"""
