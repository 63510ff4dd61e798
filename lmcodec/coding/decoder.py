"""Blocks -> their checked bytes: the decoder's half of the codec.

The decoder learns a segment's tokens one at a time, so it advances many
segments side by side, one token per row per step; consecutive LM blocks are
independent and their streams share the rows: :mod:`lmcodec.coding.rowdecode` keeps
the batch full (a row freed by a finished segment goes to the next stream at
once, rows at their own positions).  How many rows a step carries is this
machine's choice: the exact engine gives the same frequencies whatever the
batch (docs/ENGINE.md).
"""

from __future__ import annotations

import torch
import zstandard

from ..engine.engine import torch_threads
from ..errors import ChecksumError, CorruptArchiveError
from ..format.container import Block, Header, Method, stream_groups
from ..progress import Progress
from .frequencies import MIN_TOKEN_BITS
from .mixing import MixerConfig
from .modelcache import ModelCache, check_memory
from .rowdecode import decode_streams
from .settings import DecodeStats, Settings
from .steps import cache_slots


class BlockDecoder:
    """Decodes the blocks of one archive (its header, the prompt given; ``settings`` resolved),
    counting its model passes and guesses into ``stats``."""

    def __init__(self, models: ModelCache, settings: Settings, header: Header, prompt: bytes | None,
                 stats: DecodeStats | None = None):
        self.models = models
        self.settings = settings
        self.header = header
        self.prompt = prompt
        self.stats = DecodeStats() if stats is None else stats

    def decode(self, blocks: list[Block], progress: Progress | None = None) -> list[bytes]:
        """The checked bytes of consecutive blocks (LM blocks decoded together, see :meth:`_decode_lm`)."""
        progress = progress or Progress()
        if len(blocks) == 1 and blocks[0].method != Method.LM:
            raws = [unpack(blocks[0])]
        else:
            raws = self._decode_lm(blocks, progress)
        for block, raw in zip(blocks, raws):
            if not block.verify(raw):
                hint = ""
                if block.check_key and not block.payload_checked:  # short form: damage is found here too
                    hint = (" -- the archive is damaged" + (", or the engine computed different numbers than "
                            "the encoder's ('lmcodec selftest' tells)" if block.method == Method.LM else ""))
                elif block.method == Method.LM:
                    hint = (" -- the engine computed different numbers than the encoder's; run "
                            "'lmcodec selftest' on both machines")
                raise ChecksumError(f"decoded data does not match the original's checksum{hint}")
            if block.method != Method.LM:
                progress.bytes(len(raw))
        return raws

    def _decode_lm(self, blocks: list[Block], progress: Progress) -> list[bytes]:
        """The tokens of one or more LM blocks, decoded side by side; their bytes, unchecked.

        Blocks are independent, so consecutive blocks' streams share the rows:
        levels 8 and 9 make each block one segment, and without this a many-block
        file would decode one row at a time.
        """
        header, s = self.header, self.settings
        model, tok = self.models.model_for(header)
        lengths: list[int] = []
        groups: list[range] = []
        payloads: list[bytes] = []
        for block in blocks:
            first = len(lengths)
            mine = stream_groups(len(block.tokens), header.lanes)
            # Every token costs at least MIN_TOKEN_BITS (stage 1 keeps a floor of mass
            # off the top bucket), so a stream's payload bounds its token count; a
            # forged count cannot make the model run for hours.
            for i, (g, e) in enumerate(zip(mine, block.streams)):
                if sum(block.tokens[j] for j in g) * MIN_TOKEN_BITS > 8 * e.payload_len + 64:
                    raise CorruptArchiveError(f"LM stream {i} declares more tokens than its "
                                              f"{e.payload_len}-byte payload can hold")
            lengths += block.tokens
            groups += [range(first + g.start, first + g.stop) for g in mine]
            payloads += block.payloads
        engine = self.models.engine(model, s.device)
        progress.start_block(sum(b.raw_len for b in blocks), sum(lengths))
        with torch_threads(s.threads), torch.inference_mode():
            prefix = self.models.prefix(tok, self.prompt, header.context)
            pre = self.models.prefill(engine, prefix)
            # The decoder's own choice: its row budget, or fewer when there are fewer segments.
            rows = min(max(s.decode_rows, header.lanes), len(lengths))
            cuda = engine.device.type == "cuda"    # GraphStep: a cache of the whole context
            check_memory(engine.model, rows, *cache_slots(engine.arch, pre.length, header.context,
                                                          max(lengths, default=0), s.guesses,
                                                          header.context if cuda else None))
            symbols = decode_streams(engine, pre, groups, payloads, lengths, header.context, tok,
                                     MixerConfig(header.mixer), rows, tick=progress.tokens,
                                     halves=overlap_halves(engine.device), guesses=s.guesses,
                                     stats=self.stats,
                                     draft=self.models.draft_index(tok, self.prompt, prefix) if s.guesses else None)
        out, at = [], 0
        for block in blocks:
            try:
                out.append(b"".join(tok.decode(x) for x in symbols[at:at + len(block.tokens)]))
            except ValueError as exc:
                raise CorruptArchiveError(f"decoded an impossible symbol ({exc})") from exc
            at += len(block.tokens)
        return out


def overlap_halves(device: torch.device) -> int:
    """Two sets of rows taking turns (rowdecode.Overlap) where a step runs beside the coder:
    on CUDA, whose launches are asynchronous; on a CPU nothing would overlap."""
    return 2 if device.type == "cuda" else 1


def unpack(block: Block) -> bytes:
    """The bytes of a stored block (raw or zstd), unchecked."""
    if block.method == Method.RAW:
        return block.payloads[0]
    try:
        return zstandard.ZstdDecompressor().decompress(block.payloads[0], max_output_size=block.raw_len)
    except zstandard.ZstdError as exc:
        raise CorruptArchiveError(f"zstd block is corrupted ({exc})") from exc
