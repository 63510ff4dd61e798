"""The lean engine computes the model: its logits match Hugging Face's reference
implementation, step by step and in one pass, and its kernels stay exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcodec import models
from lmcodec.engine import Engine, Linear, Lockstep, onednn_usable, torch_threads


def hf_llama(loaded: models.LoadedModel):
    """Transformers' own Llama with the same weights: the reference to match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = loaded.arch
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                      intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
                      num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta,
                      tie_word_embeddings=a.tie_word_embeddings,
                      max_position_embeddings=a.max_position_embeddings)
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if a.tie_word_embeddings:
        model.tie_weights()
    return model


def engine_logits(engine: Engine, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, V] logits from one causal pass, and from T lockstep steps at batch 1."""
    n = len(ids)
    full = engine.score(ids[None])[0]
    run = Lockstep(engine, [int(ids[0])], 1, 4 * n, n)
    steps = [run.logits[0].clone()] + [run.advance(ids[t:t + 1])[0].clone() for t in range(1, n)]
    return full, torch.stack(steps)


def models_ids(loaded: models.LoadedModel, text: bytes) -> list[int]:
    from lmcodec.tokens import ByteTokenizer

    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    return [tok.start_token] + tok.model_inputs(tok.encode(text)).tolist()


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_logits_match_transformers(which, loaded_model, tiny_model_dir):
    loaded = loaded_model if which == "smollm2" else models.load(tiny_model_dir)
    text = b"Alice was beginning to get very tired of sitting by her sister on the bank, and"
    ids = torch.tensor(models_ids(loaded, text))
    with torch_threads(2), torch.inference_mode():
        ref = hf_llama(loaded)(ids[None]).logits[0].float()
        full, steps = engine_logits(Engine(loaded), ids)
    scale = ref.abs().max().item()
    assert (full - ref).abs().max().item() < 1e-4 * scale
    assert (steps - ref).abs().max().item() < 1e-4 * scale
    assert torch.equal(full.argmax(-1), ref.argmax(-1))


def test_linear_uses_prepacked_onednn_on_cpu_float32_and_agrees_with_f_linear():
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 40), torch.randn(96), torch.randn(3, 5, 40)
    lin = Linear(w, b)
    assert (lin._packed is not None) == onednn_usable()
    ref = torch.nn.functional.linear(x, w, b)
    assert torch.allclose(lin(x), ref, atol=1e-5, rtol=1e-5)
    # Same inputs, same bits: the property encoder and decoder rely on.
    assert torch.equal(lin(x), lin(x.clone()))
    # Other dtypes keep F.linear (oneDNN's bf16 is slow on CPUs without AVX-512 BF16).
    lb = Linear(w.bfloat16())
    assert lb._packed is None and lb(x.bfloat16()).dtype == torch.bfloat16


def test_lockstep_rows_do_not_depend_on_each_other(loaded_model):
    """A row's logits depend on its own tokens only, not on what the other rows hold."""
    engine = Engine(loaded_model)
    rng = np.random.default_rng(0)
    a_tokens = torch.from_numpy(rng.integers(0, 40000, 12))
    with torch_threads(2), torch.inference_mode():
        outs = []
        for other in (0, 1):
            run = Lockstep(engine, [0], 3, 64, 12)
            others = torch.from_numpy(rng.integers(0, 40000, (2, 12)))
            for t in range(12):
                logits = run.advance(torch.stack([a_tokens[t], others[0, t], others[1, t]]))
            outs.append(logits[0].clone())
    assert torch.equal(outs[0], outs[1])
