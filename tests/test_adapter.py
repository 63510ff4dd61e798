"""Dictionaries: the merged model is exact, the file is checked, a wrong dictionary is refused.

The merge (docs/ENGINE.md, "Dictionaries") is checked against
``reference.reference_merge`` and the adapted engine against ``reference_run``
on a tiny random Llama, with integer deltas chosen to hit every clamp.  Training
is only smoke-tested: its float results depend on the machine, while what the
decoder sees is the dictionary's integers.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding import runner
from lmcodec.coding.tokens import ByteTokenizer
from lmcodec.dictionary.adapter import (
    GAIN_MAX,
    ID_BYTES,
    LINEARS,
    MULT_MAX,
    SCALE_MAX,
    SCALE_MIN,
    Adapter,
    AdapterTensors,
    adapted_fingerprint,
)
from lmcodec.engine.engine import Engine, torch_threads
from lmcodec.engine.model import registry as models
from lmcodec.engine.model.quantize import load_int_model
from lmcodec.engine.spec.reference import reference_merge, reference_run
from lmcodec.errors import DictionaryError, LMCodecError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    m = models.load(tiny_model_dir)
    tok = ByteTokenizer(m.tokenizer, m.arch.vocab_size)
    return load_int_model(m, tok.fingerprint), tok


def random_tensors(model, seed: int, rank: int = 3) -> AdapterTensors:
    """Integer deltas over every target, large enough to hit the int8, mult and gain clamps."""
    rng = np.random.default_rng(seed)
    t = AdapterTensors()
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            n, k = getattr(layer, name).weight.shape
            key = f"{i}.{name}"
            t.lora[key] = (rng.integers(-127, 128, (rank, k)).astype(np.int8),
                           rng.integers(-32767, 32768, (n, rank)).astype(np.int16), int(rng.integers(14, 22)))
            t.scale[key] = rng.integers(SCALE_MIN, SCALE_MAX + 1, n).astype(np.int32)
            if name == "qkv":
                t.bias[key] = rng.integers(-(1 << 18), 1 << 18, n).astype(np.int32)
        for g in ("attn_gain", "mlp_gain"):
            t.gain[f"{i}.{g}"] = rng.integers(-(1 << 15), 1 << 15, len(getattr(layer, g))).astype(np.int32)
    t.gain["final_gain"] = rng.integers(-(1 << 15), 1 << 15, len(model.final_gain)).astype(np.int32)
    return t


def assert_models_equal(a, b):
    assert a.fingerprint == b.fingerprint
    assert torch.equal(a.final_gain, b.final_gain)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.attn_gain, lb.attn_gain) and torch.equal(la.mlp_gain, lb.mlp_gain)
        for name in LINEARS:
            x, y = getattr(la, name), getattr(lb, name)
            assert x.weight.dtype == y.weight.dtype == torch.int8
            assert torch.equal(x.weight, y.weight) and torch.equal(x.mult, y.mult) and x.shift == y.shift
            assert (x.bias is None) == (y.bias is None)
            assert x.bias is None or torch.equal(x.bias, y.bias)


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_equals_reference(tiny, seed):
    model, _ = tiny
    ad = Adapter.build(model.fingerprint, random_tensors(model, seed))
    merged = ad.apply(model)
    assert_models_equal(merged, reference_merge(model, ad.tensors, merged.fingerprint))
    # The deltas reached the clamps, and the base model is untouched.
    w = merged.layers[0].gate_up.weight
    assert (w == 127).any() and (w == -127).any()
    assert int(merged.layers[0].qkv.mult.max()) == MULT_MAX
    assert int(merged.final_gain.abs().max()) == GAIN_MAX
    assert not torch.equal(merged.layers[0].qkv.weight, model.layers[0].qkv.weight)
    assert merged.fingerprint == adapted_fingerprint(model.fingerprint, ad.fingerprint())


def test_adapted_engine_equals_reference_run(tiny):
    """The adapted model through the engine (parallel pass and steps) equals reference_run, bit for bit."""
    model, tok = tiny
    t = random_tensors(model, 2)
    for key in t.scale:           # moderate deltas: the clamps are covered above, here the logits must mean something
        t.scale[key] //= 8
    ad = Adapter.build(model.fingerprint, t)
    merged = ad.apply(model)
    prefix = [tok.start_token]
    inputs = tok.model_inputs(tok.encode(b"A dictionary adapts the model: {\"x\": 1}"))[:12]
    lam, exp = reference_run(reference_merge(model, ad.tensors, merged.fingerprint), prefix + inputs.tolist(),
                             1, 64)
    engine = Engine(merged, "cpu")
    with torch_threads(1), torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        h, e = runner.score_segment(engine, pre, inputs, 64)
        lg = engine.logits(h, e)
    assert np.array_equal(lg.exp.numpy().reshape(-1), exp)
    assert np.array_equal(lg.lam.numpy(), lam)
    base = Engine(model, "cpu")      # the engine equals the reference on the base model (test_exact)
    with torch_threads(1), torch.inference_mode():
        h, e = runner.score_segment(base, runner.prefill(base, prefix), inputs, 64)
        assert not np.array_equal(base.logits(h, e).lam.numpy(), lam)


# ----------------------------------------------------------------------------- the file

@pytest.fixture(scope="module")
def small_dict(tiny):
    model, _ = tiny
    t = random_tensors(model, 3, rank=1)
    return Adapter.build(model.fingerprint, t, primer=b"{\"primer\": true}\n", info={"test": 1})


def test_file_round_trip(small_dict, tmp_path):
    path = tmp_path / "d.lma"
    small_dict.save(path)
    again = Adapter.load(path)
    assert again.as_bytes() == small_dict.as_bytes() and len(again) == len(small_dict)
    assert again.fingerprint() == small_dict.fingerprint() and len(again.fingerprint()) == ID_BYTES
    assert again.dict_id() == int.from_bytes(small_dict.fingerprint()[:4], "little")
    assert again.primer == b"{\"primer\": true}\n"
    for (na, a), (nb, b) in zip(again.tensors.arrays(), small_dict.tensors.arrays(), strict=True):
        assert na == nb and np.array_equal(a, b) and a.dtype == b.dtype


def test_refusals(small_dict, tmp_path):
    data = small_dict.as_bytes()
    cases = {
        "bad magic": b"XXXX" + data[4:],
        "truncated": data[:-1],
        "short": data[:7],
        "empty": b"",
        "flipped": data[:40] + bytes([data[40] ^ 1]) + data[41:],
        "version": data[:4] + b"\x09" + data[5:],
    }
    for name, blob in cases.items():
        with pytest.raises(DictionaryError) as exc:
            Adapter(blob)
        assert "\n" not in str(exc.value), name
    with pytest.raises(DictionaryError, match="cannot read"):
        Adapter.load(tmp_path / "missing.lma")


def test_a_valid_digest_over_bad_content_is_refused(small_dict):
    """Content that passes the digest (re-signed) is still range-checked before any merge."""
    from lmcodec.dictionary.adapter import _digest

    data = small_dict.as_bytes()
    mlen = struct.unpack_from("<I", data, 5)[0]
    meta = data[9:9 + mlen].replace(b'"<i4"', b'"<i8"', 1)
    body = data[:5] + struct.pack("<I", len(meta)) + meta + data[9 + mlen:-ID_BYTES]
    with pytest.raises(DictionaryError, match="dtype or shape"):
        Adapter(body + _digest(body))


def test_foreign_dictionary_is_refused(small_dict, loaded_model, tokenizer):
    default = load_int_model(loaded_model, tokenizer.fingerprint)
    with pytest.raises(DictionaryError, match="belongs to model"):
        small_dict.apply(default)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_damage_is_refused(small_dict, data):
    blob = bytearray(small_dict.as_bytes())
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(blob)))
    with pytest.raises(DictionaryError):
        Adapter(bytes(blob[:cut]) if cut < len(blob) else bytes(blob))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused(raw):
    with pytest.raises(LMCodecError):
        Adapter(raw)


# ----------------------------------------------------------------------------- training (smoke)

def test_training_smoke(tiny_model_dir, tiny):
    from lmcodec.dictionary.training import train_adapter

    model, _ = tiny
    samples = [b'{"name": "item%d", "value": %d}\n' % (i, i * 7) for i in range(30)]
    ad = train_adapter(samples, model=tiny_model_dir, rank=2, max_tokens=400, steps=3, seed=0, primer_bytes=80)
    assert ad.base_fingerprint == model.fingerprint
    assert set(ad.meta["adapts"]) == {"bias", "gain", "lora", "scale"}
    assert ad.primer and len(ad.primer) <= 80
    assert ad.meta["info"]["steps"] == 3
    assert Adapter(ad.as_bytes()).fingerprint() == ad.fingerprint()
    ad.apply(model)


def test_cli_train(tiny_model_dir, tiny, tmp_path):
    """`lmcodec train DIR -o DICT`: a directory's files are the samples; an existing output needs -f."""
    from click.testing import CliRunner

    from lmcodec.cli.main import main

    model, _ = tiny
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(3):
        (samples / f"{i}.json").write_bytes(b'{"id": %d, "ok": true}\n' % i)
    out = tmp_path / "d.lma"
    args = ["train", str(samples), "-o", str(out), "-m", str(tiny_model_dir), "--steps", "1", "--max-tokens", "64"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    ad = Adapter.load(out)
    assert ad.base_fingerprint == model.fingerprint and ad.id[:16] in res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(main, ["train", str(tmp_path / "nothing"), "-o", str(tmp_path / "e.lma")])
    assert res.exit_code == 2 and "no such file" in res.output


# ----------------------------------------------------------------------------- coding with a dictionary

from conftest import FAST  # noqa: E402

import lmcodec  # noqa: E402
from lmcodec.errors import DictionaryMismatchError, ModelMismatchError  # noqa: E402

RECORD = (b'{"pagination": {"ListThings": {"input_token": "NextToken", "output_token": "NextToken", '
          b'"limit_key": "MaxResults", "result_key": "Things"}, "ListOthers": {"input_token": "Marker"}}}\n')


def default_dict(loaded_model, tokenizer, seed: int, primer: bytes | None = None) -> Adapter:
    """A small real dictionary for the default model: moderate row scales, gains and q/k/v biases."""
    model = load_int_model(loaded_model, tokenizer.fingerprint)
    rng = np.random.default_rng(seed)
    t = AdapterTensors()
    for i in range(0, len(model.layers), 3):
        n = model.layers[i].qkv.weight.shape[0]
        t.scale[f"{i}.qkv"] = rng.integers(-2000, 2000, n).astype(np.int32)
        t.bias[f"{i}.qkv"] = rng.integers(-3000, 3000, n).astype(np.int32)
        t.gain[f"{i}.mlp_gain"] = rng.integers(-300, 300, len(model.layers[i].mlp_gain)).astype(np.int32)
    return Adapter.build(model.fingerprint, t, primer=primer)


@pytest.fixture(scope="module")
def dicts(loaded_model, tokenizer):
    return {"a": default_dict(loaded_model, tokenizer, 0), "b": default_dict(loaded_model, tokenizer, 1),
            "primed": default_dict(loaded_model, tokenizer, 0, primer=RECORD[:80])}


@pytest.fixture(scope="module")
def archives(dicts):
    out = {}
    for name in ("a", "primed"):
        out[name] = lmcodec.Codec(dictionary=dicts[name], **FAST).compress(RECORD)
    out[None] = lmcodec.Codec(**FAST).compress(RECORD)
    return out


def test_round_trip_with_a_dictionary(dicts, archives, tmp_path):
    assert archives["a"] != archives[None]
    path = tmp_path / "a.lma"
    dicts["a"].save(path)
    assert lmcodec.Codec(dictionary=path, **FAST).decompress(archives["a"]) == RECORD
    # An Adapter, a path and the file's bytes are the same dictionary (one decode is enough: ~1 s each idle).
    assert lmcodec.Codec(dictionary=dicts["a"].as_bytes()).dictionary.fingerprint() == dicts["a"].fingerprint()
    # The primer is the prompt on both sides.
    assert lmcodec.Codec(dictionary=dicts["primed"], **FAST).decompress(archives["primed"]) == RECORD


def test_wrong_or_missing_dictionary_is_refused(dicts, archives):
    with pytest.raises(DictionaryMismatchError, match="wrong dictionary") as exc:
        lmcodec.Codec(dictionary=dicts["b"], **FAST).decompress(archives["a"])
    assert "\n" not in str(exc.value) and dicts["b"].id[:16] in str(exc.value)
    with pytest.raises(ModelMismatchError, match="pass it with -D"):
        lmcodec.Codec(**FAST).decompress(archives["a"])
    with pytest.raises(DictionaryMismatchError, match="without a dictionary"):
        lmcodec.Codec(dictionary=dicts["a"], **FAST).decompress(archives[None])
    with pytest.raises(DictionaryMismatchError, match="pass it with -D"):   # named before the primer's prompt
        lmcodec.Codec(**FAST).decompress(archives["primed"])


def test_corrupted_or_foreign_dictionary_is_refused(dicts, small_dict, tmp_path):
    bad = tmp_path / "bad.lma"
    data = bytearray(dicts["a"].as_bytes())
    data[len(data) // 2] ^= 0x40
    bad.write_bytes(bytes(data))
    with pytest.raises(DictionaryError, match="corrupted"):
        lmcodec.Codec(dictionary=bad, **FAST)
    with pytest.raises(DictionaryError, match="belongs to model"):
        lmcodec.Codec(dictionary=small_dict, **FAST).compress(RECORD)


def test_cli_with_a_dictionary(dicts, tmp_path):
    """-D on compress, decompress and test; a wrong -D is a one-line error with exit 1 and no output file."""
    from click.testing import CliRunner

    from lmcodec.cli.main import main

    for name in ("a", "b"):
        dicts[name].save(tmp_path / f"{name}.lma")
    src = tmp_path / "r.json"
    src.write_bytes(RECORD)
    fast = ["--segment-tokens", "24", "--lanes", "2", "--context", "32"]
    run = CliRunner().invoke
    res = run(main, ["compress", str(src), "-D", str(tmp_path / "a.lma"), *fast])
    assert res.exit_code == 0, res.output
    arc = tmp_path / "r.json.lmc"
    res = run(main, ["test", str(arc), "-D", str(tmp_path / "a.lma")])
    assert res.exit_code == 0 and "OK" in res.output, res.output
    res = run(main, ["decompress", str(arc), "-o", str(tmp_path / "out"), "-D", str(tmp_path / "b.lma")])
    assert res.exit_code == 1 and "wrong dictionary" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    res = run(main, ["decompress", str(arc), "-o", str(tmp_path / "out"), "-D", str(tmp_path / "a.lma")])
    assert res.exit_code == 0 and (tmp_path / "out").read_bytes() == RECORD
    res = run(main, ["decompress", str(arc), "-c", "-D", str(tmp_path / "missing.lma")])
    assert res.exit_code == 1 and "cannot read dictionary" in res.output
