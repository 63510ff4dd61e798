"""The integer model's weights mapped from its cache file (lmcodec.engine.model.mapped).

The int8 arrays are read-only views of the file's pages, the others copies; a truncated
file is refused; releasing a mapped array's pages drops them from the process and leaves
its values as they were (read again from the file), and an array not mapped there is left
alone.  The parallel pass that releases each layer's weights gives the same bits as one
that does not (test_exact, test_codec); here the release itself.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lmcodec.engine.model import mapped


def _resident_kb(path) -> int:
    """Resident KB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"big": rng.integers(-128, 128, (512, 1024)).astype(np.int8),
              "odd": rng.integers(-128, 128, 7).astype(np.int8),
              "mult": rng.integers(-(1 << 40), 1 << 40, 33).astype(np.int64),
              "gain": rng.integers(-(1 << 20), 1 << 20, 5).astype(np.int32)}
    path = tmp_path / "int.safetensors"
    save_file(arrays, str(path))
    return path, arrays


def test_arrays_equal_the_files_and_int8_ones_are_mapped_read_only(weights):
    path, arrays = weights
    got = mapped.map_safetensors(path)
    ref = load_file(str(path))
    assert sorted(got) == sorted(ref)
    for name, arr in got.items():
        assert arr.dtype == ref[name].dtype and np.array_equal(arr, ref[name]), name
        assert arr.flags.writeable == (arr.dtype != np.int8), name
    with pytest.raises(ValueError):
        got["big"][0, 0] = 1
    assert mapped.as_tensor(got["big"]).sum().item() == int(arrays["big"].astype(np.int64).sum())


def test_a_truncated_file_is_refused(weights, tmp_path):
    path, _ = weights
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        mapped.map_safetensors(cut)
    cut.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="truncated"):
        mapped.map_safetensors(cut)


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED") or not os.path.exists("/proc/self/smaps"),
                    reason="no madvise, or no /proc/self/smaps to read resident pages from")
def test_released_pages_leave_the_process_and_read_back_the_same(weights):
    path, arrays = weights
    got = mapped.map_safetensors(path)
    big = got["big"]
    assert int(big.astype(np.int64).sum()) == int(arrays["big"].astype(np.int64).sum())      # every page read
    before = _resident_kb(path)
    freed = mapped.release(big)
    assert freed >= big.nbytes - 2 * mmap.PAGESIZE and freed % mmap.PAGESIZE == 0
    assert before - _resident_kb(path) >= freed // 1024 - 8
    assert np.array_equal(big, arrays["big"])            # mapped back from the file
    assert mapped.release(got["odd"]) == 0               # inside one page: nothing whole to give back
    anonymous = arrays["big"].copy()
    assert mapped.release(anonymous) == 0 and np.array_equal(anonymous, arrays["big"])
    assert mapped.release(got["mult"]) == 0              # a copy, not the file's pages


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="no madvise here")
def test_the_parallel_pass_gives_each_layers_weights_back(tiny_model_dir, monkeypatch):
    """runner.score_segment (the encoder's pass) releases every layer's four matrices after the
    layer, chunk by chunk, and they are the model file's pages; the same pass's bits against the
    reference are test_exact's and test_gemma's."""
    import torch
    from conftest import load_tiny

    from lmcodec.coding import runner
    from lmcodec.engine.engine import Engine

    im, _ = load_tiny(tiny_model_dir)
    engine = Engine(im, "cpu")
    freed = []
    release = mapped.release
    monkeypatch.setattr(mapped, "release", lambda arr: freed.append(release(arr)) or freed[-1])
    monkeypatch.setattr(runner, "SCORE_CHUNK", 20)      # wider than a fused step (FUSED_ROWS)
    with torch.inference_mode():
        pre = runner.prefill(engine, [1, 2, 3])
        runner.score_segment(engine, pre, np.arange(4, 44) % im.arch.vocab_size, 64)
    assert len(freed) == 2 * 4 * len(im.layers)            # 40 positions: two chunks of 20
    assert sum(freed) > 0
