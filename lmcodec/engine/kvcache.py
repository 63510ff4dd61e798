"""The KV cache of the exact engine: int8 keys and values per layer, their magnitudes, and
(models with local layers) each slot's key position.

Steps write it (``qkv``) and read it (``attend``) through :class:`lmcodec.engine.engine.Engine`;
the runner and the decoder's steps (lmcodec.coding) decide which slot holds which position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model.quantize import IntModel


@dataclass
class KVCache:
    """Per layer: int8 keys [rows, kv heads, head dim, slots] (slots last: the kernel
    reads a key component for many slots at once), int8 values [rows, kv heads,
    slots, head dim], and each head vector's max magnitude (int32).

    A model with local (sliding-window) layers may give those layers fewer slots
    (``local_slots``): a decoder's ring of the last W positions instead of the
    whole context (docs/ENGINE.md, "Gemma 3"); they then have slots and key sets
    of their own (``Engine.forward``'s ``local``).
    """

    k: list[torch.Tensor]
    kmax: list[torch.Tensor]
    v: list[torch.Tensor]
    vmax: list[torch.Tensor]
    #: Position of the key in each slot, int64 [rows, slots]: kept only for models with local
    #: (sliding-window) layers, whose queries select keys by position (None otherwise).
    pos: torch.Tensor | None = None
    #: The same for the local layers' own slots, [rows, local slots] (None: they share ``pos``'s).
    local_pos: torch.Tensor | None = None

    @classmethod
    def empty(cls, model: IntModel, rows: int, slots: int, device, local_slots: int | None = None) -> "KVCache":
        a = model.arch
        n, hd = a.num_kv_heads, a.head_dim
        if local_slots is not None and not a.sliding_window:
            raise ValueError("local slots for a model without local layers")
        sizes = [local_slots if local_slots is not None and a.is_local(i) else slots for i in range(a.num_layers)]
        k = [torch.zeros((rows, n, hd, m), dtype=torch.int8, device=device) for m in sizes]
        v = [torch.zeros((rows, n, m, hd), dtype=torch.int8, device=device) for m in sizes]
        mag = lambda: [torch.zeros((rows, n, m), dtype=torch.int32, device=device) for m in sizes]
        pos = torch.zeros((rows, slots), dtype=torch.int64, device=device) if a.sliding_window else None
        local_pos = None if local_slots is None else torch.zeros((rows, local_slots), dtype=torch.int64, device=device)
        return cls(k, mag(), v, mag(), pos, local_pos)

    def key_positions(self, local: bool) -> torch.Tensor | None:
        """The key positions a layer's slots hold: the local layers' own when they have them."""
        return self.local_pos if local and self.local_pos is not None else self.pos

    def copy_rows(self, src: "KVCache", n_slots: int, rows=None) -> None:
        """Rows ``rows`` of self (default: all) take row 0 of ``src`` in slots [0, n_slots) (the shared prefix)."""
        at = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.int64, device=self.k[0].device)
        for layer in range(len(self.k)):
            self.k[layer][at, ..., :n_slots] = src.k[layer][:1, ..., :n_slots]
            self.kmax[layer][at, ..., :n_slots] = src.kmax[layer][:1, ..., :n_slots]
            self.v[layer][at, :, :n_slots] = src.v[layer][:1, :, :n_slots]
            self.vmax[layer][at, ..., :n_slots] = src.vmax[layer][:1, ..., :n_slots]
        for mine in (self.pos, self.local_pos):
            if mine is not None:
                mine[at, :n_slots] = src.pos[:1, :n_slots]

    def move_slots(self, src: slice, dst: int) -> None:
        """Copy slots ``src`` to start at slot ``dst`` (sliding a window down)."""
        if self.local_pos is not None:
            raise ValueError("a cache whose local layers have their own slots does not slide")
        n = src.stop - src.start
        for layer in range(len(self.k)):
            self.k[layer][..., dst:dst + n] = self.k[layer][..., src].clone()
            self.kmax[layer][..., dst:dst + n] = self.kmax[layer][..., src].clone()
            self.v[layer][:, :, dst:dst + n] = self.v[layer][:, :, src].clone()
            self.vmax[layer][..., dst:dst + n] = self.vmax[layer][..., src].clone()
        if self.pos is not None:
            self.pos[..., dst:dst + n] = self.pos[..., src].clone()


def kv_bytes(model_arch, rows: int, slots: int, local_slots: int | None = None) -> int:
    """Memory of a :class:`KVCache` (int8 values, int32 magnitudes; ``local_slots``: the local layers')."""
    a = model_arch
    n_local = sum(a.is_local(i) for i in range(a.num_layers)) if local_slots is not None else 0
    per_slot = 2 * rows * a.num_kv_heads * (a.head_dim + 4)
    return per_slot * ((a.num_layers - n_local) * slots + n_local * (local_slots or 0))
