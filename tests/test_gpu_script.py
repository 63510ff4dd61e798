"""scripts/gpu/check.sh --dry-run: the GPU check's logic, on CPU with tiny inputs.

The GPU run itself needs a lent machine (scripts/gpu/README.md); this runs the
same steps -- selftest, CPU archives decoded on the "device", the device's
archives compared with the CPU's and decoded back by cross_decode.py, the
speed benchmark at both levels -- so the script is known to work before a GPU
is found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_reports_every_field_and_its_archives_decode_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu/check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    doc = json.loads((out / "gpu-check.json").read_text())
    assert proc.returncode == 0, (doc["errors"], proc.stderr[-2000:])
    assert doc["device"] == "cpu" and doc["dry_run"] and doc["ok"] and not doc["errors"]
    assert doc["digest_ok"] is True and doc["selftest"]["digest"] == doc["selftest"]["golden"]
    assert doc["cross_decode_ok"] is True
    assert set(doc["decoded_on_device"]) >= {"v3_level6.lmc", "v3_stored.lmc"}  # the third: on a GPU
    assert all(doc["same_archive_bytes"].values()) and len(doc["same_archive_bytes"]) == 4
    for level in ("3", "6"):
        assert doc["levels"][level]["compress_Bps"] > 0 and doc["levels"][level]["decompress_Bps"] > 0
    tar = out / doc["device_archives"]
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert "manifest.json" in names and sum(n.endswith(".cpu.lmc") for n in names) == 4
    back = subprocess.run([sys.executable, "scripts/gpu/cross_decode.py", str(tar)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stdout + back.stderr
    assert back.stdout.count(": ok") == 4


def test_cross_decode_fails_on_an_archive_that_does_not_decode(tmp_path):
    """The CPU side really checks: a tar whose archive is damaged is reported, exit 1."""
    import io

    manifest = {"x": {"settings": {}, "sha256": __import__("hashlib").sha256(b"hello").hexdigest(), "prompt": None}}
    tar = tmp_path / "bad.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in {"manifest.json": json.dumps(manifest).encode(), "x.bin": b"hello",
                           "x.cuda.lmc": b"LMC\x00garbage"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    back = subprocess.run([sys.executable, "scripts/gpu/cross_decode.py", str(tar)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert back.returncode == 1 and "FAILED" in back.stdout
