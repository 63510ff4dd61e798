"""The generic CPU paths, taken on this CPU: the paths a CPU without AVX-512 VNNI runs.

``LMCODEC_CPU=generic`` (docs/ENGINE.md, "Exact products on any CPU") turns oneDNN off (so
``torch._int_mm`` is torch's generic loop and the engine's measurement picks the exact
float32 GEMMs), compiles numba's kernels for a baseline AVX2 target and leaves out the VNNI
intrinsics.  In a fresh process under it: the paths are the generic ones, the engine's
exactness tests pass against the reference, and the selftest gives the golden digest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The engine's exactness checks: the real model against the reference in every way the codec
#: runs it, the fused step included (test_exact), the parallel pass's attention GEMMs
#: (test_attend_gemm), both GEMM kernels (test_engine's).
EXACTNESS = ["tests/test_exact.py", "tests/test_attend_gemm.py",
             "tests/test_engine.py::test_both_cpu_gemm_kernels_give_the_same_integers"]


def generic_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "LMCODEC_GEMM")}
    return dict(env, LMCODEC_CPU="generic")


def test_the_switch_takes_the_generic_paths():
    code = ("import json, torch\n"
            "from lmcodec.engine.cpu import paths, int_dots\n"
            "d = paths.describe()\n"
            "d['mkldnn'] = torch.backends.mkldnn.enabled\n"
            "d['vnni'] = int_dots.available()\n"
            "print(json.dumps(d))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=generic_env(), check=True)
    d = json.loads(out.stdout.splitlines()[-1])
    assert d["generic"] and d["numba_target"] == "haswell"
    assert d["mkldnn"] is False and d["vnni"] is False
    assert d["gemm"] == "float32", d     # _int_mm is a scalar loop there: 20-60x slower, never chosen
    assert d["layer_products"] in ("int16", "halves"), d


def test_exactness_tests_pass_on_the_generic_paths():
    # test_exact's golden digest is the selftest's, checked below with the paths it reports
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "not test_golden_digest", *EXACTNESS],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, env=generic_env())
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def test_selftest_gives_the_golden_digest_on_the_generic_paths():
    proc = subprocess.run([sys.executable, "-m", "lmcodec", "selftest", "--json"], capture_output=True,
                          text=True, timeout=900, env=generic_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["digest"] == doc["golden"] and doc["step_equals_pass"]
    assert doc["cpu"]["generic"] and doc["cpu"]["gemm"] == "float32"


def test_archives_cross_between_the_paths(tmp_path):
    """Both paths write the same archive, and each path decodes the other's (this process is
    the native path; the generic one runs in subprocesses)."""
    import lmcodec

    data = b"Alice was beginning to get very tired of sitting by her sister on the bank.\n" * 3
    src = tmp_path / "in.txt"
    src.write_bytes(data)
    codec = lmcodec.Codec(level=3)
    native = codec.compress(data)
    (tmp_path / "native.lmc").write_bytes(native)
    lmc = [sys.executable, "-m", "lmcodec", "-q"]
    subprocess.run(lmc + ["compress", "-3", str(src), "-o", str(tmp_path / "generic.lmc")], check=True,
                   env=generic_env(), timeout=900)
    generic = (tmp_path / "generic.lmc").read_bytes()
    assert generic == native
    assert codec.decompress(generic) == data
    subprocess.run(lmc + ["decompress", str(tmp_path / "native.lmc"), "-o", str(tmp_path / "out")], check=True,
                   env=generic_env(), timeout=900)
    assert (tmp_path / "out").read_bytes() == data
