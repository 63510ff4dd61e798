"""Decode here, on CPU, the archives a GPU check made (its ``device-archives.tar``).

    .venv/bin/python scripts/gpu/cross_decode.py PATH/device-archives.tar

Each archive must decode to its original (carried in the tar and checked against
the sha256 the GPU recorded).  Prints one line per archive; exit status 0 only if
all of them decode.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile

import lmcodec


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    with tarfile.open(args[0]) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    manifest = json.loads(files["manifest.json"])
    bad = 0
    for name, m in manifest.items():
        original = files[f"{name}.bin"]
        blob = next(data for fname, data in files.items() if fname.startswith(f"{name}.") and fname.endswith(".lmc"))
        prompt = bytes.fromhex(m["prompt"]) if m["prompt"] else None
        ok = hashlib.sha256(original).hexdigest() == m["sha256"]
        try:
            ok = ok and lmcodec.Codec(device="cpu").decompress(blob, prompt) == original
            why = "" if ok else " (other bytes)"
        except lmcodec.LMCodecError as exc:
            ok, why = False, f" ({exc})"
        bad += not ok
        print(f"{name}: {len(blob)} bytes -> {len(original)} bytes on cpu: {'ok' if ok else 'FAILED'}{why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
