"""The worker's side of :mod:`lmcodec.cluster.executor`: a Ray actor that keeps models loaded and runs jobs.

Imported by the driver only with ``--cluster`` (through :mod:`lmcodec.cluster.executor`)
and by the cluster's worker processes; it does not import Ray itself (the
driver wraps :class:`Worker` with ``ray.remote``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from typing import Any


class Worker:
    """The body of a Ray actor: model caches, and calls that run a job on one item.

    A plain class (wrapped with ``ray.remote`` at run time) so that importing
    this module does not import Ray.  The job arrives with the driver's
    settings; the worker runs it on its own device and threads (neither is
    recorded, and results do not depend on them).
    """

    def __init__(self, threads: int, device: str, ops: str | None, exit_hook: str | None):
        self.threads = threads
        self.device = device
        self.ops = ops
        self.exit_hook = exit_hook
        self._caches: dict = {}

    def _context(self, spec: str | None, dictionary: bytes | None = None):
        """One :class:`~lmcodec.coding.context.BlockContext` (its models, a
        :class:`~lmcodec.coding.modelcache.ModelCache`) per (model argument, dictionary), kept
        for the worker's life.

        The dictionary arrives as its file's bytes and is parsed and checked here
        (:class:`~lmcodec.dictionary.adapter.Adapter`) like a file given with ``-D``; it is
        merged into the model once per worker, not once per block.
        """
        key = (spec, None if dictionary is None else hashlib.blake2b(dictionary, digest_size=16).digest())
        if key not in self._caches:
            from ..coding.context import BlockContext
            from ..coding.modelcache import ModelCache
            from ..dictionary.adapter import Adapter

            ops = None
            if self.ops == "torch":   # test-only: tensor ops instead of the numba kernels
                from ..engine import ops_torch as ops
            adapter = None if dictionary is None else Adapter(dictionary)
            self._caches[key] = BlockContext(ModelCache(spec, adapter, ops=ops))
        return self._caches[key]

    def _models(self, spec: str | None, dictionary: bytes | None = None):
        """The models of :meth:`_context`."""
        return self._context(spec, dictionary).models

    def run(self, index: int, job, item) -> tuple[bytes, Any]:
        """``job(context, item)`` here; returns (the fingerprint of the model it used, the result)."""
        from ..progress import Progress

        job = replace(job, settings=replace(job.settings, device=self.device, threads=self.threads))
        ctx = self._context(job.model, job.dictionary)
        progress = Progress(self.exit_callback(index))
        result = job(ctx, item, progress)
        return _fingerprint(job, ctx.models), result

    def exit_callback(self, index: int):
        """The test hook (``LMCODEC_TEST_WORKER_EXIT=INDEX[:MARKER]``, read by the driver):
        a progress callback that ends the process with ``os._exit`` at the first tokens
        of call INDEX (0-based, in input order), in the middle of its block.  With
        MARKER, only if that file does not exist yet: the worker creates it first, so
        it dies once and the retry codes the block."""
        if self.exit_hook is None:
            return None
        at, _, marker = self.exit_hook.partition(":")
        if int(at) != index:
            return None

        def die(_nbytes: int) -> None:
            if marker:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:   # died once already: code the block this time
                    return
            os._exit(17)

        return die

    def load(self, model: str | None) -> bytes:
        """Load ``model`` now (before the first block); its fingerprint."""
        return self._models(model).load(model)[0].fingerprint

    def selftest(self, model: str | None) -> dict:
        """:func:`lmcodec.coding.selftest.run` on this worker's engine (a health check)."""
        import socket

        from ..coding import selftest
        from ..engine.engine import torch_threads

        models = self._models(model)
        int_model, tok, name = models.load(model)
        with torch_threads(self.threads):
            res = selftest.run(models.engine(int_model, self.device), tok)
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": self.device, "model": name,
                "fingerprint": res.fingerprint, "digest": res.digest, "steps_agree": res.steps_agree}


def _fingerprint(job, models) -> bytes:
    """The fingerprint of the base model ``job`` codes with on this worker (empty: no model needed).

    The base model's, as an archive's header records it: a dictionary's deltas
    are named by its id, and arrive as the file's bytes, which
    :class:`~lmcodec.dictionary.adapter.Adapter` checks against that id.
    """
    if not job.model_check:
        return b""
    header = getattr(job, "header", None)
    spec = models.model_arg
    if header is not None:        # decoding: the archive's model and dictionary, checked against its header
        models.model_for(header)
        if spec is None:
            spec = header.model_name
    return models.base_fingerprint(spec)
