"""What a compression run is told (:class:`Settings`) and what it measured (:class:`Stats`).

The coding layout (level, context, segment tokens, lanes, mixer, block size) is
recorded in the archive; device, threads and decode rows are this machine's
business only (the exact engine gives the same bits whatever they are).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..format.container import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LANES,
    LEVELS,
    MAX_CONTEXT,
    MAX_LANES,
    MIN_CONTEXT,
)
from .mixerconfig import MixerConfig

#: The levels' settings are part of the format (container.LEVELS: a header stores
#: only the level). Levels 1-7 cut a block into segments decoded side by side (each
#: a cold start); 8 and 9 make a block one segment, past the model's trained
#: positions (the prefix moves along, runner.sink_base), and decode it one token at
#: a time.
DEFAULT_LEVEL = 6
#: Most guesses per row and pass on a CPU (the decoder's own choice, Settings.guesses; coding.draft).
MOST_GUESSES = 8
#: Rows the decoder advances together (several streams at once); its own choice.
DECODE_ROWS = {"cpu": 64, "cuda": 1024}


def max_kv_bytes() -> int:
    """Refuse to allocate more KV cache than this (``LMCODEC_MAX_KV_GIB``, default 16)."""
    try:
        return int(float(os.environ.get("LMCODEC_MAX_KV_GIB", "16")) * 2**30)
    except ValueError:
        return 16 * 2**30


@dataclass(frozen=True)
class Settings:
    """Compression parameters.

    A ``level`` (1..9, default :data:`DEFAULT_LEVEL`) sets the segment length,
    context and online models; any of them given explicitly overrides it (the
    archive then records level 0, "custom").  The coding layout (level,
    context, segment tokens, lanes, mixer, block size) is recorded in the
    archive; device, threads, decode rows and guesses are this machine's business
    only (results do not depend on them).
    """

    device: str = "auto"
    threads: int | None = None
    segment_tokens: int | None = None
    context: int | None = None
    lanes: int = DEFAULT_LANES
    block_size: int = DEFAULT_BLOCK_SIZE
    method: str = "auto"  # auto | lm | zstd | raw
    decode_rows: int | None = None
    guesses: int | None = None   # most guessed tokens a decoding row is fed per pass (0: none; MOST_GUESSES)
    mixer: int | None = None     # online models mixed with the LM (lmcodec.coding.mixing.MixerConfig mask)
    level: int | None = None

    def resolved(self) -> "Settings":
        """Every field filled in and checked; ``level`` is 0 when an explicit field overrides it."""
        import torch  # here, not at import: the commands that only read archives never load it

        from ..engine.engine import pick_device

        level = DEFAULT_LEVEL if self.level is None else self.level
        if level not in LEVELS:
            raise UsageError(f"level must be 1..{max(LEVELS)}, not {level}")
        base = LEVELS[level]
        seg = base.segment_tokens if self.segment_tokens is None else self.segment_tokens
        context = base.context if self.context is None else self.context
        mixer = base.mixer if self.mixer is None else self.mixer
        if (seg, context, mixer) != (base.segment_tokens, base.context, base.mixer):
            level = 0
        device = pick_device(self.device)
        threads = self.threads or max(1, min(torch.get_num_threads(), 8))
        if self.method not in ("auto", "lm", "zstd", "raw"):
            raise UsageError(f"method must be auto, lm, zstd or raw, not {self.method!r}")
        if not 1 <= threads <= 256:
            raise UsageError("threads must be 1..256")
        if not MIN_CONTEXT <= context <= MAX_CONTEXT or not 1 <= seg <= 1 << 30:
            raise UsageError(f"context must be {MIN_CONTEXT}..{MAX_CONTEXT} tokens and segment tokens >= 1")
        if not 1 <= self.lanes <= MAX_LANES:
            raise UsageError(f"lanes must be 1..{MAX_LANES}")
        if not 4096 <= self.block_size <= 64 << 20:
            raise UsageError("block size must be 4 KiB..64 MiB")
        try:
            MixerConfig(mixer)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        rows = self.decode_rows or DECODE_ROWS[device]
        # On by default where measured (CPU); CUDA's GraphStep takes guesses too, unmeasured on a GPU yet.
        guesses = (MOST_GUESSES if device == "cpu" else 0) if self.guesses is None else self.guesses
        if not 0 <= guesses <= 64:
            raise UsageError("guesses must be 0..64")
        return Settings(device, threads, seg, context, self.lanes, self.block_size, self.method, max(1, rows),
                        guesses, mixer, level)


@dataclass
class Stats:
    """What a compression run measured.

    ``model_bits`` is the exact code length of the coded symbols under the
    engine's integer frequencies (-log2 of stage 1 times stage 2): the size
    the range coder approaches, up to its few words per stream.
    """

    input_bytes: int = 0
    output_bytes: int = 0
    tokens: int = 0
    lm_bytes: int = 0          # input bytes coded by the model (not stored by fallback)
    lm_payload_bytes: int = 0  # range-coder payload bytes of those blocks
    model_bits: float = 0.0    # sum of -log2 (coding probability) over the coded symbols
    escapes: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0  # of ``seconds``: in the model (parallel passes, output heads), this process's blocks
    passes: int = 0            # the model's parallel passes (this process's blocks)
    methods: list[str] = field(default_factory=list)

    @property
    def bpb(self) -> float:
        """Archive bits per input byte, every byte of the archive counted."""
        return 8 * self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    @property
    def model_bpb(self) -> float:
        """The model's code length in bits per byte over the LM-coded bytes."""
        return self.model_bits / self.lm_bytes if self.lm_bytes else 0.0

    @property
    def coder_overhead(self) -> float:
        """Payload bits over the model's ideal bits, minus one (0.001 = 0.1%)."""
        return 8 * self.lm_payload_bytes / self.model_bits - 1 if self.model_bits else 0.0

    def add(self, encoded) -> None:
        """Count one block the encoder made (an :class:`lmcodec.coding.encoder.EncodedBlock`)."""
        self.methods.append(encoded.block.method.name.lower())
        if encoded.lm:  # only coded bits that end up in the archive count
            self.model_bits += encoded.model_bits
            self.lm_payload_bytes += sum(len(p) for p in encoded.block.payloads)
            self.lm_bytes += encoded.block.raw_len
            self.tokens += encoded.block.n_tokens
            self.escapes += encoded.escapes
        self.model_seconds += encoded.model_seconds
        self.passes += encoded.passes

    def as_dict(self) -> dict:
        return dict(input_bytes=self.input_bytes, output_bytes=self.output_bytes, bpb=self.bpb,
                    model_bpb=self.model_bpb, coder_overhead=self.coder_overhead, tokens=self.tokens,
                    lm_bytes=self.lm_bytes, escapes=self.escapes, seconds=self.seconds,
                    model_seconds=self.model_seconds, passes=self.passes, methods=sorted(set(self.methods)))


def summary(tokens: int, seconds: float, model_seconds: float, passes: int) -> str:
    """``-v``'s last line: where a run's time went, model and coding (the rest), per token."""
    coding = max(0.0, seconds - model_seconds)
    per_pass = f", {tokens / passes:.2f} tokens a pass" if passes else ""
    us = f"coding {1e6 * coding / tokens:.0f} us/token" if tokens else "no tokens coded"
    return (f"{tokens} tokens in {seconds:.2f} s: model {model_seconds:.2f} s, coding {coding:.2f} s; "
            f"{passes} pass{'' if passes == 1 else 'es'}{per_pass}; {us}")


@dataclass
class DecodeStats:
    """What a decode did: model passes, the rows they advanced, tokens decoded (so tokens
    per row-pass: 1 without guesses), and how the guesses fared."""

    passes: int = 0
    row_passes: int = 0
    tokens: int = 0
    tried: int = 0
    held: int = 0
    model_seconds: float = 0.0   # in the model's passes and output heads; the rest of a decode is coding

    @property
    def tokens_per_row_pass(self) -> float:
        return self.tokens / self.row_passes if self.row_passes else 0.0

    def as_dict(self) -> dict:
        return dict(passes=self.passes, row_passes=self.row_passes, tokens=self.tokens, guesses_tried=self.tried,
                    guesses_held=self.held, tokens_per_row_pass=self.tokens_per_row_pass,
                    model_seconds=self.model_seconds)
