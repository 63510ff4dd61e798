"""Bits/byte of a Gemma 3 GGUF through lmcodec's exact engine against HF's float model.

    python scripts/gemma_engine_vs_float.py MODEL.gguf TEXT_FILE [BYTES]

Both score the same token ids (the model's own tokenizer, after <bos>, one pass
with the whole text in context); the figure is the cross-entropy of the ids
under each model's logits (float64 log-softmax of the engine's exact logits),
not an archive's size. A check of the engine's reading of the architecture
(docs/ENGINE.md, "Gemma 3"): the two should be within a fraction of a percent.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROWS = 256     # logits rows at a time: a row of 262,144 float64s is 2 MB


def bits(rows, ids: list[int]) -> tuple[float, np.ndarray]:
    """(cross-entropy in bits of ``ids``, argmax per row) under the float64 logit rows that the
    iterable ``rows`` yields in blocks (row i predicts ids[i])."""
    total, best, i = 0.0, [], 0
    for block in rows:
        z = block - block.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        total -= float((z[np.arange(len(z)), ids[i:i + len(z)]] - lse).sum())
        best.append(block.argmax(1))
        i += len(z)
    return total / math.log(2), np.concatenate(best)


def main(gguf: str, text_file: str, n_bytes: int = 3000) -> None:
    from transformers import AutoModelForCausalLM

    from lmcodec.coding import runner
    from lmcodec.engine.model import registry as models
    from lmcodec.engine.engine import Engine
    from lmcodec.engine.model.quantize import load_int_model

    text = Path(text_file).read_bytes()[:n_bytes].decode("utf-8", errors="ignore")
    n = len(text.encode())
    loaded = models.load(gguf)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
    bos = loaded.tokenizer.token_to_id("<bos>")
    print(f"{n} bytes, {len(ids)} tokens", flush=True)
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(torch.tensor([[bos] + ids[:-1]])).last_hidden_state[0]
        flt_bits, flt_best = bits((model.lm_head(hidden[i:i + ROWS]).double().numpy()
                                   for i in range(0, len(ids), ROWS)), ids)
    del model
    print(f"float model  {flt_bits / n:.4f} bits/byte", flush=True)
    engine = Engine(load_int_model(loaded, b"engine-vs-float!"), "cpu")
    runner.SCORE_CHUNK = 128                        # bounds ops_torch.attend's memory
    t0 = time.time()
    with torch.inference_mode():
        pre = runner.prefill(engine, [bos])
        h, e = runner.score_segment(engine, pre, np.array(ids[:-1]), len(ids) + 1)

        def exact():
            for i in range(0, len(ids), ROWS):
                lg = engine.logits(h[i:i + ROWS], e[i:i + ROWS])
                yield lg.lam.double().numpy() * np.exp2(lg.exp.double().numpy())
        ex_bits, ex_best = bits(exact(), ids)
    agree = float((ex_best == flt_best).mean())
    print(f"exact engine {ex_bits / n:.4f} bits/byte ({time.time() - t0:.0f} s); "
          f"argmax agrees at {agree:.1%} of positions")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
