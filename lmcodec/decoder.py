"""Blocks -> their checked bytes: the decoder's half of the codec.

The decoder learns a segment's tokens one at a time, so it advances many
segments in lockstep (:class:`~lmcodec.runner.Lockstep`), one token per step;
consecutive LM blocks are independent and share lockstep batches.  How many
rows a step carries is this machine's choice: the exact engine gives the same
frequencies whatever the batch (docs/ENGINE.md).
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from .coder import StreamDecoder
from .container import Block, Header, Method, stream_groups
from .engine import Engine, torch_threads
from .errors import ChecksumError, CorruptArchiveError
from .frequencies import MIN_TOKEN_BITS, CodingTables
from .mixing import MixerConfig, StreamMixer
from .modelcache import ModelCache, check_memory
from .progress import Progress
from .runner import Lockstep, Prefix, prefill
from .settings import Settings
from .tokens import ByteTokenizer


class BlockDecoder:
    """Decodes the blocks of one archive (its header, the prompt given; ``settings`` resolved)."""

    def __init__(self, models: ModelCache, settings: Settings, header: Header, prompt: bytes | None):
        self.models = models
        self.settings = settings
        self.header = header
        self.prompt = prompt

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
                if block.check_key:  # v5 short form: no CRCs, so damage is found here too
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

        Blocks are independent, so consecutive blocks' streams can share lockstep
        batches: levels 8 and 9 make each block one segment, and without this a
        many-block file would decode one row at a time.
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
        symbols = [np.zeros(n, dtype=np.int64) for n in lengths]
        progress.start_block(sum(b.raw_len for b in blocks), sum(lengths))
        # The decoder's own choice: as many whole streams per lockstep batch as fit its row budget.
        batches, cur = [], []
        for i, g in enumerate(groups):
            if cur and sum(len(groups[j]) for j in cur) + len(g) > max(s.decode_rows, header.lanes):
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        with torch_threads(s.threads), torch.inference_mode():
            pre = prefill(engine, self.models.prefix(tok, self.prompt, header.context))
            for batch in batches:
                _decode_streams(engine, pre, [groups[i] for i in batch],
                                [StreamDecoder(payloads[i]) for i in batch], lengths, symbols,
                                header.context, tok, MixerConfig(header.mixer), progress)
        out, at = [], 0
        for block in blocks:
            try:
                out.append(b"".join(tok.decode(x) for x in symbols[at:at + len(block.tokens)]))
            except ValueError as exc:
                raise CorruptArchiveError(f"decoded an impossible symbol ({exc})") from exc
            at += len(block.tokens)
        return out


def _decode_streams(engine: Engine, pre: Prefix, groups: list[range], decoders: list[StreamDecoder],
                    lengths: list[int], symbols: list[np.ndarray], context: int, tok: ByteTokenizer,
                    mixer: MixerConfig, progress: Progress) -> None:
    """Decode several streams in one lockstep batch (rows = their segments)."""
    segs = [g for group in groups for g in group]
    longest = max(lengths[g] for g in segs)
    check_memory(engine.model, len(segs), min(context, pre.length + longest))
    run = Lockstep(engine, pre, len(segs), context, longest)
    feed = np.full(len(segs), tok.placeholder, dtype=np.int64)
    alphabet = tok.alphabet_size
    mixers = [StreamMixer(mixer, len(group), alphabet) for group in groups]
    first = np.cumsum([0] + [len(group) for group in groups])   # row of each stream's first segment
    for t in range(longest):
        # Per stream: its live lanes (segment order) and their rows in the batch.
        live = [[i for i, g in enumerate(group) if t < lengths[g]] for group in groups]
        rows = [first[k] + i for k, lanes in enumerate(live) for i in lanes]
        gaps = engine.gaps(run.h[rows], run.e[rows])
        mixed, at = [], 0
        for m, lanes in zip(mixers, live):
            mixed.append(m.mix(lanes, gaps[at:at + len(lanes)]))
            at += len(lanes)
        tables = CodingTables(torch.cat(mixed), alphabet)
        stage1 = tables.stage1()
        spans = np.cumsum([0] + [len(lanes) for lanes in live])
        buckets = np.zeros(len(rows), dtype=np.int64)
        for k, dec in enumerate(decoders):
            buckets[spans[k]:spans[k + 1]] = dec.decode(stage1[spans[k]:spans[k + 1]])
        stage2 = tables.stage2(buckets)
        for k, (group, dec, lanes) in enumerate(zip(groups, decoders, live)):
            sym = buckets[spans[k]:spans[k + 1]] * tables.width + dec.decode(stage2[spans[k]:spans[k + 1]])
            if (sym >= alphabet).any():
                raise CorruptArchiveError("decoded a symbol outside the alphabet")
            for i, x in zip(lanes, sym.tolist()):
                symbols[group[i]][t] = x
                feed[first[k] + i] = x if x < tok.vocab_size else tok.placeholder
            mixers[k].update(sym.tolist())
        progress.tokens(len(rows))
        if t + 1 < longest:
            run.advance(feed)


def unpack(block: Block) -> bytes:
    """The bytes of a stored block (raw or zstd), unchecked."""
    if block.method == Method.RAW:
        return block.payloads[0]
    try:
        return zstandard.ZstdDecompressor().decompress(block.payloads[0], max_output_size=block.raw_len)
    except zstandard.ZstdError as exc:
        raise CorruptArchiveError(f"zstd block is corrupted ({exc})") from exc
