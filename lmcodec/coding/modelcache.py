"""Loaded models, their engines and prompt prefixes, kept for many coding calls.

Loading a model costs seconds, so the encoder, the decoder and the public
facade share one :class:`ModelCache`; a cluster worker holds its own.
"""

from __future__ import annotations

import os
from typing import Protocol

from ..engine.engine import Engine
from ..engine.kvcache import kv_bytes
from ..engine.model import registry as models
from ..engine.model.quantize import IntModel, load_int_model
from ..errors import DictionaryMismatchError, ModelMismatchError, ResourceLimitError
from ..format.container import DICT_ID_BYTES, Header, prompt_check
from .draft import DRAFT_PROMPT_BYTES
from .draftbank import PrefixTable
from .runner import Prefix, prefill
from .settings import max_kv_bytes
from .tokens import ByteTokenizer


class ModelAdapter(Protocol):
    """What the cache needs of a dictionary (:class:`lmcodec.Adapter`, which sits above this
    wing): merging it into a model, and the fingerprint an archive names it by."""

    id: str

    def apply(self, model: IntModel) -> IntModel: ...

    def fingerprint(self) -> bytes: ...


#: Bytes of the prompt's tail tokenized per token of prefix kept (a token is
#: rarely over 16 bytes), bounding the work a huge prompt causes.
PROMPT_TAIL_BYTES_PER_TOKEN = 16

ModelSpec = str | os.PathLike | None


class ModelCache:
    """Models by argument, engines by (fingerprint, device), prefixes by prompt.

    ``model``: the registry name, GGUF path or HF directory given by the user
    (``None``: the default model to compress with, the archive's registered
    model to decompress with).  ``ops``: the engines' backend module (``None``:
    the device's own; a cluster test runs one worker on ``ops_torch`` to show
    that both backends code the same bits).  ``adapter``: a dictionary
    (:class:`lmcodec.Adapter`) merged into every model loaded (docs/ENGINE.md,
    "Dictionaries"); it must belong to that model.
    """

    def __init__(self, model: ModelSpec = None, adapter: ModelAdapter | None = None, *, ops=None):
        self.model_arg = model
        self._drafts: dict[tuple, PrefixTable] = {}     # the last prompt's draft index
        self.ops = ops
        self.adapter = adapter
        self._models: dict[str, tuple[IntModel, ByteTokenizer, str]] = {}
        self._bases: dict[str, bytes] = {}     # the base model's fingerprint under an adapter
        self._engines: dict[tuple, Engine] = {}
        self._prefixes: dict[tuple, list[int]] = {}
        self._prefilled: dict[tuple, Prefix] = {}

    def load(self, spec: ModelSpec = None) -> tuple[IntModel, ByteTokenizer, str]:
        """(integer model, tokenizer, display name) of a model argument, loaded once."""
        key = str(spec) if spec is not None else models.DEFAULT_MODEL
        if key not in self._models:
            m = models.load(spec)
            tok = ByteTokenizer(m.tokenizer, m.arch.vocab_size)
            model = load_int_model(m, tok.fingerprint)
            self._bases[key] = model.fingerprint
            if self.adapter is not None:
                model = self.adapter.apply(model)     # DictionaryError: it belongs to another model
            self._models[key] = (model, tok, m.name)
        return self._models[key]

    def coding_model(self) -> tuple[IntModel, ByteTokenizer, str]:
        """The model this cache compresses with (the user's argument or the default)."""
        return self.load(self.model_arg)

    def engine(self, model: IntModel, device: str) -> Engine:
        """The engine of ``model`` on ``device``, built once (where an LM block starts running the model)."""
        key = (model.fingerprint, device)
        if key not in self._engines:
            self._engines[key] = Engine(model, device, ops=self.ops)
        return self._engines[key]

    def base_fingerprint(self, spec: ModelSpec = None) -> bytes:
        """The fingerprint of a loaded model without the dictionary (what an archive's model check holds)."""
        self.load(spec)
        return self._bases[str(spec) if spec is not None else models.DEFAULT_MODEL]

    def dict_id(self) -> bytes:
        """What an archive records of the dictionary: the first DICT_ID_BYTES of its id (b"" without one)."""
        return self.adapter.fingerprint()[:DICT_ID_BYTES] if self.adapter is not None else b""

    def check_dictionary(self, header: Header) -> None:
        """Refuse a missing, extra or other dictionary, naming the id the archive expects."""
        given = self.dict_id()
        if header.dict_id == given:
            return
        if not given:
            raise DictionaryMismatchError(f"archive was made with dictionary {header.dict_id.hex()}: pass it with -D")
        if not header.dict_id:
            raise DictionaryMismatchError(
                f"archive was made without a dictionary, but dictionary {given.hex()} was given")
        raise DictionaryMismatchError(f"wrong dictionary: archive needs dictionary {header.dict_id.hex()}, "
                                      f"got {given.hex()} ({self.adapter.id[:16]})")

    def model_for(self, header: Header) -> tuple[IntModel, ByteTokenizer]:
        """The model an archive needs: the user's, checked against the header, or its registered one.

        The header's model check is the base model's; the dictionary is checked by
        its id (:meth:`check_dictionary`), and the archive's content check covers both.
        """
        self.check_dictionary(header)
        spec = self.model_arg
        if spec is None:
            if header.model_name not in models.REGISTRY:
                raise ModelMismatchError(
                    f"archive was made with model {header.model_name!r} "
                    f"(fingerprint {header.model_fingerprint.hex()[:16]}), which is not registered; "
                    "pass it with --model PATH")
            spec = header.model_name
        model, tok, name = self.load(spec)
        base = self.base_fingerprint(spec)
        stored = header.model_fingerprint   # v4, v5: its first 8 bytes; v3: all 16
        if base[:len(stored)] != stored:
            tfp = header.tokenizer_fingerprint  # v3 only: names a tokenizer mismatch
            if tfp and tok.fingerprint[:len(tfp)] != tfp:
                raise ModelMismatchError(
                    f"wrong model: archive needs {header.model_name!r} (tokenizer "
                    f"{tfp.hex()[:16]}), {name!r} has tokenizer {tok.fingerprint.hex()[:16]}")
            raise ModelMismatchError(
                f"wrong model: archive needs {header.model_name!r} "
                f"(fingerprint {stored.hex()[:16]}), "
                f"got {name!r} (fingerprint {base.hex()[:16]})")
        return model, tok

    def prefix(self, tok: ByteTokenizer, prompt: bytes | None, context: int) -> list[int]:
        """Start token + the prompt's last tokens (at most half the context).

        Only the prompt's last ``PROMPT_TAIL_BYTES_PER_TOKEN * keep`` bytes are
        tokenized (both sides do the same), so a 100 MB prompt costs what a
        short one does; the whole prompt is still hashed for the prompt check.
        """
        if not prompt:
            return [tok.start_token]
        key = (tok.fingerprint, prompt_check(prompt), len(prompt), context)
        if key not in self._prefixes:
            keep = context // 2 - 1
            tail = prompt[-PROMPT_TAIL_BYTES_PER_TOKEN * keep:]
            self._prefixes[key] = [tok.start_token] + tok.model_inputs(tok.encode(tail)).tolist()[-keep:]
        return self._prefixes[key]

    def draft_index(self, tok: ByteTokenizer, prompt: bytes | None, prefix: list[int]) -> PrefixTable:
        """What the decoder's guesses may copy from before a segment: the prompt's last
        :data:`DRAFT_PROMPT_BYTES` as symbols (a dictionary's primer is far longer than the
        model's prefix, and the guesses may use all of it: they never change a symbol),
        else the prefix; built once per prompt."""
        if not prompt:
            return PrefixTable(prefix)
        key = (tok.fingerprint, prompt_check(prompt), len(prompt))
        if key not in self._drafts:
            self._drafts.clear()
            self._drafts[key] = PrefixTable(tok.encode(prompt[-DRAFT_PROMPT_BYTES:]))
        return self._drafts[key]

    def prefill(self, engine: Engine, prefix: list[int]) -> Prefix:
        """The prefix run through ``engine``, kept for the next block or file with the same prefix.

        Many small files coded with one prompt or dictionary primer would each run
        the same ~1,000-token prefix again; a :class:`~lmcodec.coding.runner.Prefix` is
        only read once made, so one serves them all.  The last
        :data:`PREFILLS_KEPT` are kept (one row of P tokens of KV cache each).
        """
        key = (engine.fingerprint, str(engine.device), tuple(prefix))
        pre = self._prefilled.pop(key, None)
        if pre is None:
            pre = prefill(engine, prefix)
        self._prefilled[key] = pre                      # most recent last
        while len(self._prefilled) > PREFILLS_KEPT:
            self._prefilled.pop(next(iter(self._prefilled)))
        return pre


#: Prefixes kept run (ModelCache.prefill): a few prompts or dictionaries in turn.
PREFILLS_KEPT = 4


def check_memory(model: IntModel, rows: int, slots: int, local_slots: int | None = None) -> None:
    """Refuse a KV cache over :func:`lmcodec.coding.settings.max_kv_bytes` before allocating it
    (``local_slots``: the local layers' own, steps.cache_slots)."""
    need = kv_bytes(model.arch, rows, slots, local_slots)
    if need > max_kv_bytes():
        raise ResourceLimitError(
            f"coding needs {need / 2**30:.1f} GiB of KV cache ({rows} rows x {slots} slots), over the "
            f"{max_kv_bytes() / 2**30:.1f} GiB limit (LMCODEC_MAX_KV_GIB)")
