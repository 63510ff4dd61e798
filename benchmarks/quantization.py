"""What integer arithmetic costs in ratio: the float model against the exact engine.

    python -m benchmarks.quantization [--file PATH | --suite smoke] [--window N] [--variants] [--json OUT]

Scores a text in windows of ``--window`` tokens (each window starts cold after
the start token) three ways and prints bits per byte of each:

* the float32 model (Hugging Face transformers' Llama with the same weights):
  its cross-entropy, the yardstick;
* with ``--variants``, fake-quantized float models, to show what each integer
  width costs on its own (int8 weights per output row; int16 or int8
  activations per token; an int8 KV cache per token and head);
* the exact integer engine (what lmcodec codes with): the exact code length of
  its integer coding frequencies, i.e. the bits the range coder is handed.

Escaped bytes cost the same 24 + 16 bits in every column (they are rare).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .corpus import CorpusError, add_file_args, corpus_root, load_suite, read_file_arg


def float_llama(loaded):
    """Transformers' Llama with the model's float32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = loaded.arch
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                      num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps,
                      rope_theta=a.rope_theta, tie_word_embeddings=a.tie_word_embeddings,
                      max_position_embeddings=a.max_position_embeddings)
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(loaded.weights, strict=False)
    if a.tie_word_embeddings:
        model.tie_weights()
    return model


def _fake(x: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Symmetric fake quantization along ``dim`` (max-abs scale)."""
    q = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / q
    return (x / scale).round().clamp(-q, q) * scale


def fake_quantized(loaded, weights: bool, act_bits: int | None, kv_bits: int | None):
    """A float model with fake-quantized weights / linear inputs / k and v (before RoPE)."""
    model = float_llama(loaded)
    head_dim = loaded.arch.head_dim
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if weights:
                with torch.no_grad():
                    mod.weight.copy_(_fake(mod.weight, 8))
            if act_bits:
                mod.register_forward_pre_hook(lambda m, args: (_fake(args[0], act_bits),))
            if kv_bits and name.endswith(("k_proj", "v_proj")):
                def kv_hook(m, args, out):
                    shape = out.shape
                    return _fake(out.view(*shape[:-1], -1, head_dim), kv_bits).view(shape)
                mod.register_forward_hook(kv_hook)
    if weights and loaded.arch.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(_fake(model.model.embed_tokens.weight.detach(), 8))
    return model


def float_bits(model, tok, windows) -> float:
    total = 0.0
    vocab = tok.vocab_size
    with torch.inference_mode():
        for ids, sym in windows:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            known = sym < vocab
            picked = logp[np.flatnonzero(known), sym[known]]
            # Escapes: the model's own probability has no say; count the coder's flat cost.
            total += float(-picked.sum()) / math.log(2) + 40.0 * int((~known).sum())
    return total


def engine_bits(codec, tok, windows) -> float:
    from lmcodec.coding.frequencies import CodingTables
    from lmcodec.coding.runner import score_ids

    model, _, _ = codec.models.coding_model()
    engine = codec.models.engine(model, "cpu")
    total = 0.0
    with torch.inference_mode():
        for ids, sym in windows:
            h, e = score_ids(engine, torch.tensor([ids]))
            for c in range(0, len(sym), 256):
                tables = CodingTables(engine.weights(h[c:c + 256], e[c:c + 256], tok.alphabet_size),
                                      tok.alphabet_size)
                total += float(tables.bits(sym[c:c + 256]).sum())
    return total


def make_windows(tok, data: bytes, window: int) -> list[tuple[list[int], np.ndarray]]:
    """(model inputs [start token + tokens but the last], the tokens) per window of the text."""
    symbols = tok.encode(data)
    inputs = tok.model_inputs(symbols)
    out = []
    for s in range(0, len(symbols), window):
        sym = symbols[s:s + window]
        out.append(([tok.start_token] + inputs[s:s + len(sym) - 1].tolist(), sym))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__.split("\n\n")[0])
    add_file_args(ap)
    ap.add_argument("--suite", default=None, help="score every file of this suite instead of one file")
    ap.add_argument("--window", type=int, default=1024, help="tokens per cold window [1024]")
    ap.add_argument("--variants", action="store_true", help="also the fake-quantized float variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import lmcodec
    from lmcodec.engine.model import registry as models

    if args.suite:
        try:
            texts = [(rel, data) for rel, data, _ in load_suite(corpus_root(args.corpus), args.suite)]
        except CorpusError as exc:
            print(f"benchmarks.quantization: error: {exc}", file=sys.stderr)
            return 2
    else:
        path, data = read_file_arg(args)
        texts = [(str(path), data)]
    codec = lmcodec.Codec(args.model, device="cpu", threads=args.threads)
    _, tok, _ = codec.models.load(args.model)
    loaded = models.load(args.model)
    windows = [w for _, data in texts for w in make_windows(tok, data, args.window)]
    nbytes = sum(len(d) for _, d in texts)
    n_tokens = sum(len(s) for _, s in windows)

    rows = [("float32 model (transformers)", float_bits(float_llama(loaded), tok, windows))]
    if args.variants:
        for label, cfg in (("int8 weights per row", (True, None, None)),
                           ("+ int16 activations per token", (True, 16, None)),
                           ("+ int8 KV cache per token and head", (True, 16, 8)),
                           ("int8 weights, int8 activations", (True, 8, None))):
            rows.append((f"fake-quant: {label}", float_bits(fake_quantized(loaded, *cfg), tok, windows)))
    rows.append(("exact integer engine (coded)", engine_bits(codec, tok, windows)))
    base = rows[0][1]
    print(f"{len(texts)} text(s), {nbytes} bytes, {n_tokens} tokens, windows of {args.window}")
    print("| variant | bits/byte | vs float32 |\n|---|---:|---:|")
    for label, bits in rows:
        print(f"| {label} | {bits / nbytes:.4f} | {bits / base - 1:+.2%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "texts": [t for t, _ in texts], "bytes": nbytes, "tokens": n_tokens, "window": args.window,
            "float_bits": base, "engine_bits": rows[-1][1],
            "rows": [{"variant": label, "bits": bits, "bpb": bits / nbytes} for label, bits in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
