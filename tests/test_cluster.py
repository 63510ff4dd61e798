"""``--cluster``: blocks coded by Ray workers give the same archive, byte for byte, as one process.

One private ``local:2`` cluster serves the whole module (starting Ray costs
seconds).  Inputs are a few 4 KiB blocks coded with the tiny 2-layer model
(``tiny_model_dir``, LM forced: its random weights would lose to zstd), so the
model's work is small and the tests measure the cluster, not the CPU.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from click.testing import CliRunner

from lmcodec.cli.main import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (pip install 'lmcodec[cluster]')")

CLUSTER = "local:2"
#: 4 KiB blocks (the smallest), short segments and context, one thread per worker.
SMALL = ["--block-size", "4096", "--segment-tokens", "64", "--context", "32", "--lanes", "2",
         "--method", "lm", "--threads", "1"]


def _text(seed: int, n: int) -> bytes:
    """``n`` bytes of varied lines (so blocks are cut at line breaks, as real text is)."""
    words = ["lossless", "block", "worker", "the", "archive", "model", "exact", "integer", "cluster", "bytes"]
    lines, i = [], seed
    while sum(map(len, lines)) < n:
        i = (i * 1103515245 + 12345) % 2**31
        lines.append(" ".join(words[(i >> k) % len(words)] for k in range(0, 24, 3)) + f" {i % 997}\n")
    return "".join(lines).encode()[:n]


A = _text(1, 6000)    # two blocks: one on each worker
B = _text(2, 2500)    # one block


@pytest.fixture(scope="module")
def cluster():
    """The module's Ray runtime: a private local:2 cluster, shut down after the module."""
    from lmcodec.cluster import executor as cl

    cl.connect(CLUSTER)
    yield CLUSTER
    cl.disconnect()


def run(*args, env=None):
    return CliRunner().invoke(main, ["-q", *map(str, args)], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The in-process archives of A and B (no cluster involved)."""
    d = tmp_path_factory.mktemp("ref")
    out = {}
    for name, data in (("a", A), ("b", B)):
        (d / name).write_bytes(data)
        r = run("compress", "-m", tiny_model_dir, *SMALL, "-o", d / f"{name}.lmc", d / name)
        assert r.exit_code == 0, r.output
        out[name] = (d / f"{name}.lmc").read_bytes()
    return out


def _inputs(tmp_path):
    (tmp_path / "a").write_bytes(A)
    (tmp_path / "b").write_bytes(B)
    return tmp_path / "a", tmp_path / "b"


def test_cluster_archives_equal_in_process_ones_and_round_trip(cluster, reference, tiny_model_dir, tmp_path):
    a, b = _inputs(tmp_path)
    r = run("compress", "--cluster", cluster, "-m", tiny_model_dir, *SMALL, a, b)   # two files, one executor
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.lmc").read_bytes() == reference["a"]
    assert (tmp_path / "b.lmc").read_bytes() == reference["b"]
    # Decoding costs more than encoding: the round trips use the one-block file.
    b.unlink()   # made on the cluster, decoded in this process
    assert run("decompress", "-m", tiny_model_dir, tmp_path / "b.lmc").exit_code == 0
    assert b.read_bytes() == B
    (tmp_path / "ref.lmc").write_bytes(reference["b"])   # made in this process, decoded on the cluster
    r = run("decompress", "--cluster", cluster, "-m", tiny_model_dir, "-o", tmp_path / "b.out", tmp_path / "ref.lmc")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.out").read_bytes() == B
    r = run("test", "-m", tiny_model_dir, tmp_path / "ref.lmc", env={"LMCODEC_CLUSTER": cluster})
    assert r.exit_code == 0, r.output


def test_a_worker_dying_in_a_block_changes_no_byte(cluster, reference, tiny_model_dir, tmp_path):
    a, _ = _inputs(tmp_path)
    marker = tmp_path / "died"
    r = run("compress", "--cluster", cluster, "-m", tiny_model_dir, *SMALL, a,
            env={"LMCODEC_TEST_WORKER_EXIT": f"1:{marker}"})
    assert r.exit_code == 0, r.output
    assert marker.exists()                      # the worker did die in block 1 ...
    assert (tmp_path / "a.lmc").read_bytes() == reference["a"]   # ... and was retried to the same bytes


def test_retries_running_out_is_one_line_and_writes_nothing(cluster, tiny_model_dir, tmp_path):
    a, _ = _inputs(tmp_path)
    r = run("compress", "--cluster", cluster, "-m", tiny_model_dir, *SMALL, a,
            env={"LMCODEC_TEST_WORKER_EXIT": "0", "LMCODEC_CLUSTER_RETRIES": "1"})
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcodec: error:") and "retries" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]   # no archive, no temporary file


def test_workers_on_different_backends_make_the_same_archive(cluster, reference, tiny_model_dir, tmp_path):
    a, _ = _inputs(tmp_path)
    r = run("compress", "--cluster", cluster, "-m", tiny_model_dir, *SMALL, a,
            env={"LMCODEC_TEST_WORKER_OPS": "cpu,torch"})   # numba kernels on one worker, tensor ops on the other
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.lmc").read_bytes() == reference["a"]


@pytest.fixture(scope="module")
def tiny_dict(tmp_path_factory, tiny_model_dir):
    """A dictionary file for the tiny model: row scales, q/k/v biases and gains on every layer, a primer."""
    import numpy as np

    from lmcodec.coding.tokens import ByteTokenizer
    from lmcodec.dictionary.adapter import Adapter, AdapterTensors
    from lmcodec.engine.model import registry as models
    from lmcodec.engine.model.quantize import load_int_model

    m = models.load(tiny_model_dir)
    model = load_int_model(m, ByteTokenizer(m.tokenizer, m.arch.vocab_size).fingerprint)
    rng = np.random.default_rng(5)
    t = AdapterTensors()
    for i, layer in enumerate(model.layers):
        n = layer.qkv.weight.shape[0]
        t.scale[f"{i}.qkv"] = rng.integers(-3000, 3000, n).astype(np.int32)
        t.bias[f"{i}.qkv"] = rng.integers(-5000, 5000, n).astype(np.int32)
        t.gain[f"{i}.mlp_gain"] = rng.integers(-500, 500, len(layer.mlp_gain)).astype(np.int32)
    path = tmp_path_factory.mktemp("dict") / "tiny.dict"
    Adapter.build(model.fingerprint, t, primer=b"block worker archive\n").save(path)
    return path


def test_a_dictionary_codes_the_same_bytes_on_the_cluster(cluster, tiny_model_dir, tiny_dict, tmp_path):
    """-D with --cluster: the workers merge the dictionary the driver sends, and the archive is
    the in-process one; it decodes on the cluster, and without the dictionary it is refused."""
    _, b = _inputs(tmp_path)
    r = run("compress", "-m", tiny_model_dir, *SMALL, "-D", tiny_dict, "-o", tmp_path / "ref.lmc", b)
    assert r.exit_code == 0, r.output
    r = run("compress", "--cluster", cluster, "-m", tiny_model_dir, *SMALL, "-D", tiny_dict, b)
    assert r.exit_code == 0, r.output
    made = (tmp_path / "b.lmc").read_bytes()
    assert made == (tmp_path / "ref.lmc").read_bytes()
    r = run("compress", "-m", tiny_model_dir, *SMALL, "-c", b)
    assert r.stdout_bytes != made                                     # the dictionary did change the coding
    r = run("decompress", "--cluster", cluster, "-m", tiny_model_dir, "-D", tiny_dict, "-o", tmp_path / "b.out",
            tmp_path / "b.lmc")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.out").read_bytes() == B
    r = run("test", "--cluster", cluster, "-m", tiny_model_dir, tmp_path / "b.lmc")
    assert r.exit_code == 1 and "pass it with -D" in r.stderr, r.output


def test_a_result_from_another_model_is_refused(cluster, tiny_model_dir):
    from lmcodec.cluster.executor import RayExecutor
    from lmcodec.coding.settings import Settings
    from lmcodec.errors import ModelMismatchError
    from lmcodec.executors import EncodeJob
    from lmcodec.progress import Progress

    s = Settings(method="lm", block_size=4096, segment_tokens=64, context=32, lanes=2, threads=1).resolved()
    job = EncodeJob(s, None, str(tiny_model_dir), model_check=b"\0" * 8)   # a header naming another model
    with RayExecutor(cluster, workers=1) as ex:
        with pytest.raises(ModelMismatchError, match="another model"):
            list(ex.map(job, [b"hello\n"], Progress()))


def test_the_local_cluster_is_private(cluster):
    import ray

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN"]
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.slow
def test_selftest_runs_on_every_worker(cluster):
    """The real model's golden digest, computed by each worker (RayExecutor.check)."""
    import json

    r = run("selftest", "--cluster", cluster, "--threads", "1", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and len({w["pid"] for w in doc["workers"]}) == 2
    from lmcodec.coding.selftest import GOLDEN

    assert all(w["digest"] == GOLDEN[w["fingerprint"]] for w in doc["workers"])


def test_addresses_are_parsed():
    from lmcodec.cluster.executor import Target, parse_address
    from lmcodec.errors import UsageError

    assert parse_address("local:3") == Target(None, 3)
    assert parse_address("ray://head:10001") == Target("ray://head:10001", None)
    assert parse_address("local").workers >= 1
    for bad in ("", "local:0", "local:x"):
        with pytest.raises(UsageError):
            parse_address(bad)
