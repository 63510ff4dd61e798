#!/usr/bin/env python
"""Corruption campaign: damage real archives and check that the decoder never lies.

Real archives are made with the real default model (SmolLM2-135M, small
segments so each takes a few seconds) and with the stored methods (zstd, raw,
several blocks).  Each one is then corrupted many ways:

* ``flip-header-bit``: every bit of every header, one at a time (exhaustive);
* ``truncate-boundary``: cut at, just before and just after every structure
  boundary (header fields, block header, token table, stream table, block CRC,
  each payload, end record);
* ``flip-random``: 1-3 random bits anywhere;  ``truncate-random``;
* ``splice``: a prefix of one archive + a suffix of another (random offsets,
  half of them at structure boundaries);
* ``version`` / ``fingerprint``: the format version or the model / tokenizer
  fingerprint changed, with and without re-signing the header CRC;
* ``resign-header`` / ``resign-block`` / ``resign-end``: one field of a header,
  block header, token or stream table, or end record changed to a random or
  hostile value and the CRC recomputed with zlib.crc32, so the deeper checks are
  reached.

Every result must be the exact original (e.g. a re-signed parameter a stored
block does not use) or an :class:`lmcodec.LMCodecError` with a one-line
message.  A wrong output, any other exception, or a case running past
``--timeout`` seconds is a failure (exit status 1).

Decoding an LM archive runs the 135M model (tens of ms a step on a CPU), so
the campaign counts how many cases reached the model (``Codec._engine``, where
an LM block's decoding starts running it): nearly all must be refused by the
CRC and structure checks first.  Mutations that by construction can only be
caught after the model ran (a re-signed block checksum, a changed coding
parameter of an LM archive) are limited to ``--deep`` cases.

    python scripts/corruption_campaign.py --count 10000 --seed 1 --json campaign.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import struct
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmcodec  # noqa: E402
from lmcodec.container import VERSION  # noqa: E402
from lmcodec.errors import LMCodecError  # noqa: E402

LM_SETTINGS = dict(segment_tokens=24, lanes=2, context=32, threads=2)

#: Format v3 sizes (lmcodec/container.py): header parameters after the model name,
#: fixed part of a block header, one token count, one stream entry, end record.
PARAMS = 54          # model fp 16, tokenizer fp 16, prompt check 8, context 4, segment tokens 4, lanes 2, block size 4
BLOCK_FIXED = 22     # tag 1, method 1, raw_len 4, check 8, n_segments 4, n_streams 4
TOKEN = 4
STREAM = 8           # payload_len 4, payload_crc 4
END = 25             # tag 1, total 8, check 8, n_blocks 4, CRC 4

TEXTS = {
    "prose": (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
              b"it was the age of foolishness, it was the epoch of belief, it was the epoch of "
              b"incredulity, it was the season of Light, it was the season of Darkness.\n"),
    "code": (b"def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
             b"    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
             b"if __name__ == '__main__':\n    print([fib(i) for i in range(10)])\n"),
    "unicode": ("Grüße aus Köln! Ein naïves Café, 日本語のテキスト, и немного русского текста. "
                "Emoji: 😀👍🏽. The end.\n").encode(),
}
PROMPT = b"A Tale of Two Cities, by Charles Dickens. Book the First: Recalled to Life."


@dataclass
class Sample:
    name: str
    blob: bytes
    original: bytes
    prompt: bytes | None
    lm: bool
    header_end: int = 0
    params: int = 0                      # offset of the fixed header parameters
    blocks: list[dict] = field(default_factory=list)
    end_start: int = 0

    def boundaries(self) -> list[int]:
        p = self.params
        b = {0, 4, 5, 6, 7, p, p + 16, p + 32, p + 40, p + 44, p + 48, p + 50, p + PARAMS, self.header_end,
             self.end_start, self.end_start + 1, self.end_start + 9, self.end_start + 17, self.end_start + 21,
             len(self.blob)}
        for blk in self.blocks:
            s = blk["start"]
            b |= {s, s + 1, s + 2, s + 6, s + 14, s + 18, blk["fixed_end"], blk["streams_start"],
                  blk["table_end"], blk["crc_end"], *blk["payload_ends"]}
        return sorted(b)


def describe(sample: Sample) -> Sample:
    """Fill in the structure offsets of a valid archive."""
    blob = sample.blob
    n = blob[6]
    sample.params = 7 + n
    sample.header_end = sample.params + PARAMS + 4
    pos = sample.header_end
    while blob[pos] == 0x42:
        n_seg, n_str = struct.unpack_from("<II", blob, pos + 14)
        fixed_end = pos + BLOCK_FIXED
        streams_start = fixed_end + TOKEN * n_seg
        table_end = streams_start + STREAM * n_str
        ends, p = [], table_end + 4
        for i in range(n_str):
            p += struct.unpack_from("<I", blob, streams_start + STREAM * i)[0]
            ends.append(p)
        sample.blocks.append(dict(start=pos, fixed_end=fixed_end, streams_start=streams_start,
                                  table_end=table_end, crc_end=table_end + 4, payload_ends=ends,
                                  n_seg=n_seg, n_str=n_str))
        pos = p
    sample.end_start = pos
    assert pos + END == len(blob), sample.name
    return sample


def build_corpus(lm_codec: lmcodec.Codec, small: bool = False) -> list[Sample]:
    """Real archives: LM-coded small texts (one with a prompt) and stored zstd/raw ones."""
    out: list[Sample] = []
    texts = dict(list(TEXTS.items())[:1]) if small else TEXTS
    for name, text in texts.items():
        out.append(Sample(f"lm-{name}", lm_codec.compress(text), text, None, True))
    if not small:
        out.append(Sample("lm-prose-prompt", lm_codec.compress(TEXTS["prose"], PROMPT),
                          TEXTS["prose"], PROMPT, True))
    rng = random.Random(1234)
    noise = bytes(rng.getrandbits(8) for _ in range(600))
    many = b"".join(b"%05d " % i + TEXTS["prose"][i % 50:i % 50 + 40] + b"\n" for i in range(220))
    stored = [
        ("zstd-prose", dict(method="zstd"), TEXTS["code"] * 3, None),
        ("zstd-blocks", dict(method="zstd", block_size=4096), many, None),
        ("zstd-prompt", dict(method="zstd"), TEXTS["unicode"], PROMPT),
        ("raw-noise", dict(method="raw"), noise, None),
        ("raw-blocks", dict(method="raw", block_size=4096), (noise * 16)[:9000], None),
        ("raw-empty", dict(method="raw"), b"", None),
    ]
    if small:
        stored = [stored[1], stored[4], stored[5]]
    for name, settings, data, prompt in stored:
        out.append(Sample(name, lmcodec.Codec(**settings).compress(data, prompt), data, prompt, False))
    for s in out:
        describe(s)
        assert lm_codec.decompress(s.blob, s.prompt) == s.original, s.name
    return out


# -- mutations ------------------------------------------------------------------------

@dataclass
class Case:
    kind: str
    sample: str
    what: str
    blob: bytes
    expected: bytes
    prompt: bytes | None
    deep: bool = False


def _resign(buf: bytearray, start: int, end: int) -> None:
    """Recompute the CRC32 of buf[start:end] stored at buf[end:end + 4]."""
    struct.pack_into("<I", buf, end, zlib.crc32(bytes(buf[start:end])))


def _flip(buf: bytearray, bit: int) -> None:
    buf[bit // 8] ^= 1 << (bit % 8)


def exhaustive_cases(corpus: list[Sample]) -> list[Case]:
    cases = []
    for s in corpus:
        for bit in range(s.header_end * 8):
            buf = bytearray(s.blob)
            _flip(buf, bit)
            cases.append(Case("flip-header-bit", s.name, f"bit {bit}", bytes(buf), s.original, s.prompt))
        cuts = sorted({c for b in s.boundaries() for c in (b - 1, b, b + 1) if 0 <= c < len(s.blob)})
        for cut in cuts:
            cases.append(Case("truncate-boundary", s.name, f"cut {cut}", s.blob[:cut], s.original, s.prompt))
    return cases


def _hostile_int(rng: random.Random, size: int, old: int) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, top, top - 1, old + 1, max(old - 1, 0), old * 2, old // 2,
               rng.randrange(top + 1), 1 << rng.randrange(8 * size)]
    value = rng.choice(choices) & top
    return value if value != old else (old + 1) & top


def _maybe_resign_header(rng: random.Random, buf: bytearray, s) -> str:
    """Half the time, fix the header CRC after a change (" re-signed"), else leave it ("")."""
    if rng.random() < 0.5:
        _resign(buf, 0, s.header_end - 4)
        return " re-signed"
    return ""


def _overwrite(rng: random.Random, buf: bytearray, name: str, off: int, fmt: str,
               pick: Callable[[random.Random, int, int], int] = _hostile_int) -> str:
    """Overwrite one field: random bytes for a digest ("8s"), ``pick``'s value for an
    integer; return what changed."""
    if fmt == "8s":
        buf[off:off + 8] = rng.randbytes(8)
        return name
    size = struct.calcsize(fmt)
    old = struct.unpack_from("<" + fmt, buf, off)[0]
    new = pick(rng, size, old)
    struct.pack_into("<" + fmt, buf, off, new)
    return f"{name} {old} -> {new}"


def random_case(rng: random.Random, corpus: list[Sample], kind: str) -> Case:
    s = rng.choice(corpus)
    buf = bytearray(s.blob)
    p = s.params
    if kind == "flip-random":
        bits = rng.sample(range(len(buf) * 8), k=min(len(buf) * 8, rng.choice([1, 1, 2, 3])))
        for bit in bits:
            _flip(buf, bit)
        return Case(kind, s.name, f"bits {bits}", bytes(buf), s.original, s.prompt)
    if kind == "truncate-random":
        cut = rng.randrange(len(s.blob))
        return Case(kind, s.name, f"cut {cut}", s.blob[:cut], s.original, s.prompt)
    if kind == "splice":
        donor = rng.choice(corpus)
        if rng.random() < 0.5:
            i = rng.choice([b for b in s.boundaries() if b > 0])
            j = rng.choice([b for b in donor.boundaries() if b < len(donor.blob)])
        else:
            i, j = rng.randrange(1, len(s.blob) + 1), rng.randrange(len(donor.blob))
        return Case(kind, f"{s.name}+{donor.name}", f"[:{i}] + [{j}:]", s.blob[:i] + donor.blob[j:],
                    donor.original, s.prompt)
    if kind == "version":
        buf[4] = rng.choice([v for v in range(256) if v != VERSION])
        signed = _maybe_resign_header(rng, buf, s)
        return Case(kind, s.name, f"version {buf[4]}{signed}", bytes(buf), s.original, s.prompt)
    if kind == "fingerprint":
        which = rng.choice(["model", "tokenizer"])
        off = p if which == "model" else p + 16
        if rng.random() < 0.5:
            _flip(buf, off * 8 + rng.randrange(128))
        else:
            buf[off:off + 16] = rng.randbytes(16)
        signed = _maybe_resign_header(rng, buf, s)
        # A stored-only archive never loads a model: a re-signed fingerprint is harmless there.
        return Case(kind, s.name, f"{which} fingerprint{signed}", bytes(buf), s.original, s.prompt)
    if kind == "resign-header":
        fields = [("flags", 5, "B"), ("context", p + 40, "I"), ("segment_tokens", p + 44, "I"),
                  ("lanes", p + 48, "H"), ("block_size", p + 50, "I"), ("prompt_check", p + 32, "8s"),
                  ("name", 7, "name")]
        name, off, fmt = rng.choice(fields)
        if fmt == "name":
            new = rng.choice([b"", b"smollm2-135m", b"smollm2-360m", rng.randbytes(rng.randrange(1, 12))])
            buf[6:p] = bytes([len(new)]) + new
            header_end = 7 + len(new) + PARAMS + 4
            what = f"name {new!r}"
        else:
            what = _overwrite(rng, buf, name, off, fmt)
            header_end = s.header_end
        _resign(buf, 0, header_end - 4)
        return Case(kind, s.name, what, bytes(buf), s.original, s.prompt, deep=s.lm)
    if kind == "resign-block":
        if not s.blocks:
            return random_case(rng, corpus, "resign-end")
        blk = rng.choice(s.blocks)
        b = blk["start"]
        fields = [("tag", b, "B"), ("method", b + 1, "B"), ("raw_len", b + 2, "I"), ("check", b + 6, "8s"),
                  ("n_segments", b + 14, "I"), ("n_streams", b + 18, "I")]
        fields += [(f"seg{i}.tokens", blk["fixed_end"] + TOKEN * i, "I") for i in range(blk["n_seg"])]
        for i in range(blk["n_str"]):
            e = blk["streams_start"] + STREAM * i
            fields += [(f"stream{i}.payload_len", e, "I"), (f"stream{i}.payload_crc", e + 4, "I")]
        name, off, fmt = rng.choice(fields)
        what = _overwrite(rng, buf, name, off, fmt)
        _resign(buf, b, blk["table_end"])
        # Only a changed block checksum of an LM block survives to the model (and fails after it).
        return Case(kind, s.name, what, bytes(buf), s.original, s.prompt, deep=s.lm and name == "check")
    if kind == "resign-end":
        e = s.end_start
        name, off, fmt = rng.choice([("tag", e, "B"), ("total", e + 1, "Q"), ("check", e + 9, "8s"),
                                     ("n_blocks", e + 17, "I")])
        what = _overwrite(rng, buf, name, off, fmt)
        _resign(buf, e, e + 21)
        return Case(kind, s.name, what, bytes(buf), s.original, s.prompt, deep=s.lm and name == "check")
    raise ValueError(kind)


RANDOM_KINDS = {"flip-random": 30, "truncate-random": 10, "splice": 15, "version": 5, "fingerprint": 8,
                "resign-header": 10, "resign-block": 15, "resign-end": 7}


def make_cases(corpus: list[Sample], count: int, seed: int, deep: int) -> list[Case]:
    """``count`` corruptions: up to 60% from the exhaustive lists, the rest random."""
    rng = random.Random(seed)
    originals = {s.blob for s in corpus}
    exhaustive = exhaustive_cases(corpus)
    take = min(len(exhaustive), int(count * 0.6))
    cases = rng.sample(exhaustive, take)
    kinds, weights = zip(*RANDOM_KINDS.items())
    n_deep = 0
    while len(cases) < count:
        case = random_case(rng, corpus, rng.choices(kinds, weights)[0])
        if case.blob in originals:
            continue  # not a corruption (e.g. a splice that rebuilt a whole archive)
        if case.deep:
            if n_deep >= deep:
                continue
            n_deep += 1
        cases.append(case)
    rng.shuffle(cases)
    return cases


# -- running --------------------------------------------------------------------------

class Hang(BaseException):
    """A case ran past its time limit (raised from SIGALRM; not an Exception, so not caught)."""


def _alarm(signum, frame):
    raise Hang()


def run_cases(codec: lmcodec.Codec, cases: list[Case], timeout: int = 120, log=None) -> dict:
    """Decode every case with ``codec``; count outcomes and the cases that reached the model.

    An LM block's decoding asks ``codec._engine`` for the model's engine only after
    the structure checks, the token bound and the fingerprints: each such call is
    one model run, and the whole decode time of a case that made one counts as
    model time.
    """
    model = {"runs": 0, "seconds": 0.0}
    original_engine = codec._engine
    shadowed = "_engine" in vars(codec)

    def counting_engine(*args, **kwargs):
        model["runs"] += 1
        return original_engine(*args, **kwargs)

    codec._engine = counting_engine
    outcomes: Counter = Counter()
    by_kind: dict[str, Counter] = defaultdict(Counter)
    reached: Counter = Counter()
    failures: list[dict] = []
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    try:
        for n, case in enumerate(cases):
            runs_before = model["runs"]
            t_case = time.perf_counter()
            signal.alarm(timeout)
            detail = ""
            try:
                out = codec.decompress(case.blob, case.prompt)
            except LMCodecError as exc:
                msg = str(exc)
                outcome = f"error:{type(exc).__name__}"
                if "\n" in msg or not msg.strip():
                    outcome, detail = "bad-message", msg
            except Hang:
                outcome = "hang"
            except Exception as exc:  # noqa: BLE001 - exactly what the campaign looks for
                outcome, detail = f"crash:{type(exc).__name__}", repr(exc)[:300]
            else:
                outcome = "exact-original" if out == case.expected else "wrong-output"
            finally:
                signal.alarm(0)
            outcomes[outcome] += 1
            by_kind[case.kind][outcome] += 1
            if model["runs"] > runs_before:
                reached[case.kind] += 1
                model["seconds"] += time.perf_counter() - t_case
            if outcome in ("wrong-output", "hang", "bad-message") or outcome.startswith("crash:"):
                failures.append(dict(kind=case.kind, sample=case.sample, what=case.what, outcome=outcome,
                                     detail=detail, blob_b64=base64.b64encode(case.blob).decode()[:20000]))
            if log and (n + 1) % 1000 == 0:
                log(f"{n + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s, "
                    f"{model['runs']} model runs")
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if shadowed:
            codec._engine = original_engine
        else:
            del codec._engine
    bad = sum(v for k, v in outcomes.items()
              if k in ("wrong-output", "hang", "bad-message") or k.startswith("crash:"))
    return dict(total=len(cases), outcomes=dict(sorted(outcomes.items())),
                rejected=sum(v for k, v in outcomes.items() if k.startswith("error:")),
                exact_original=outcomes["exact-original"], wrong_output=outcomes["wrong-output"],
                crash=sum(v for k, v in outcomes.items() if k.startswith("crash:")),
                hang=outcomes["hang"], bad_message=outcomes["bad-message"], failures_total=bad,
                by_kind={k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
                reached_model=sum(reached.values()), reached_model_by_kind=dict(sorted(reached.items())),
                model_runs=model["runs"], model_seconds=round(model["seconds"], 1),
                seconds=round(time.perf_counter() - t0, 1), failures=failures[:50])


def format_report(r: dict) -> str:
    lines = [f"total corrupted archives: {r['total']}  ({r['seconds']} s decoding)"]
    lines.append(f"  rejected with an LMCodecError: {r['rejected']}")
    for k, v in r["outcomes"].items():
        if k.startswith("error:"):
            lines.append(f"    {k[6:]:<28} {v}")
    lines.append(f"  exact original:                {r['exact_original']}")
    lines.append(f"  wrong output (must be 0):      {r['wrong_output']}")
    lines.append(f"  crash (must be 0):             {r['crash']}")
    lines.append(f"  hang (must be 0):              {r['hang']}")
    lines.append(f"  multi-line message (must be 0): {r['bad_message']}")
    lines.append(f"  reached the model: {r['reached_model']} cases ({r['model_seconds']} s in the model)"
                 f" {r['reached_model_by_kind']}")
    lines.append("by mutation:")
    for kind, v in r["by_kind"].items():
        lines.append(f"  {kind:<18} " + ", ".join(f"{k}={n}" for k, n in v.items()))
    for f in r["failures"][:10]:
        lines.append(f"FAILURE {f['outcome']}: {f['kind']} {f['sample']} {f['what']} {f['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10000, help="corrupted archives to try [10000]")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    ap.add_argument("--deep", type=int, default=40,
                    help="at most this many mutations that can only fail after the model ran [40]")
    ap.add_argument("--timeout", type=int, default=120, help="seconds one case may take [120]")
    ap.add_argument("--small", action="store_true", help="a smaller corpus (one LM archive)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    codec = lmcodec.Codec(**LM_SETTINGS)
    corpus = build_corpus(codec, small=args.small)
    built = time.perf_counter() - t0
    print(f"corpus: {len(corpus)} archives ({', '.join(f'{s.name}:{len(s.blob)}B' for s in corpus)}) "
          f"built in {built:.1f} s", file=sys.stderr)
    cases = make_cases(corpus, args.count, args.seed, args.deep)
    report = run_cases(codec, cases, args.timeout, log=lambda m: print(m, file=sys.stderr))
    report.update(seed=args.seed, count=args.count, deep=args.deep, corpus_seconds=round(built, 1),
                  wall_seconds=round(time.perf_counter() - t0, 1),
                  corpus=[dict(name=s.name, archive_bytes=len(s.blob), original_bytes=len(s.original),
                               lm=s.lm, prompt=s.prompt is not None, blocks=len(s.blocks)) for s in corpus],
                  command=" ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]))
    print(format_report(report))
    print(f"wall time {report['wall_seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["failures_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
