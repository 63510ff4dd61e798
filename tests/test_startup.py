"""The commands that only print or read an archive start like a shell tool: without torch.

``lmcodec --version``, ``--help``, ``info``, ``-l`` and ``models`` are what tar, shell
completion and scripts call often; each runs in a fresh interpreter here, and none may
import torch, numba, transformers or the engine (which take seconds to load).  Their
whole-process times are a benchmark (docs/SPEED.md, "Start-up"), not a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
HEAVY = ("torch", "numba", "transformers", "lmcodec.engine.engine", "lmcodec.codec", "lmcodec.coding.mixing")

PROBE = """
import sys
from lmcodec.cli.main import main
try:
    main(args=sys.argv[1:], prog_name="lmcodec")
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
import json
print("\\nLOADED " + json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)
sys.exit(code)
"""


def run_fresh(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                          capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stderr.splitlines() if x.startswith("LOADED ")]
    assert line, proc.stderr
    return proc, json.loads(line[-1][len("LOADED "):])


@pytest.mark.parametrize("args", [
    ("--version",), ("--help",), ("models",), ("info", str(DATA / "v5_level6.lmc")),
    ("-l", str(DATA / "v5_level6.lmc")), ("info", "--json", str(DATA / "v4_level6_prompt.lmc")),
], ids=lambda a: " ".join(x if "/" not in x else Path(x).name for x in a))
def test_printing_commands_leave_the_model_unloaded(args):
    proc, loaded = run_fresh(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert loaded == [], f"lmcodec {' '.join(args)} imported {loaded}"


def test_the_check_sees_a_command_that_loads_the_model():
    """The probe itself: a command that decodes (``test`` of an archive) imports what it needs."""
    proc, loaded = run_fresh("test", str(DATA / "v5_stored.lmc"))
    assert proc.returncode == 0, proc.stderr
    assert "lmcodec.codec" in loaded and "torch" in loaded


def test_import_lmcodec_is_light_and_its_classes_load_on_use():
    code = ("import sys, lmcodec; light = 'torch' not in sys.modules; "
            "c = lmcodec.Codec; print(light, 'torch' in sys.modules, c.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "True", "lmcodec.codec"]
