"""Editing spread over processes: PyTorch's own stack (`torchrun` launch, a `torch.distributed` process group; NCCL
for CUDA ranks, gloo on CPU), one node or several.

    torchrun --nproc_per_node 4 editing_classifier.py --video_path talk.mp4 --attribute Mustache --scale 0.3

Without torchrun (WORLD_SIZE unset or 1) everything runs in one process, as before. Within one video every stage
splits its frames into contiguous shares, one per rank (`Ranks.share`); the small whole-video quantities (the faces
found in each frame, from which the smoothed quads follow) are exchanged with all-gather, so every rank computes
exactly the quads and the identity average of a single-process run. The per-frame arrays (crops, masks, x_T, renders)
are written by their owners into the same cache entry, which therefore must be on a filesystem every rank sees (one
node: any; several nodes: a shared cluster filesystem such as Lustre or GPFS, not NFS). Each rank marks its own
progress, so a re-run with any number of ranks resumes from what every rank finished.

A rank that fails prints which frames it was working on; the others stop at their next collective (torchrun ends
them at once; otherwise the collective's timeout, DVA_DIST_TIMEOUT seconds, default 1800, ends the wait with a
clear message), and the same command resumes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np


class RankError(RuntimeError):
    """Another rank stopped (or a collective timed out): re-run the same command to resume."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, index: np.ndarray, rank: int | None = None) -> np.ndarray:
        """This rank's (or `rank`'s) contiguous part of `index` (all of it in a single process)."""
        rank = self.rank if rank is None else rank
        return np.array_split(np.asarray(index), self.world)[rank] if self.enabled else np.asarray(index)

    def items(self, items: list) -> list:
        """Whole items (e.g. videos) for this rank: every world-th, from its rank on."""
        return items[self.rank::self.world]

    def _call(self, what: str, fn, *args) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses of many kinds
            raise RankError(f'rank {self.rank}: {what} failed, another rank has stopped ({type(e).__name__}: '
                            f'{str(e).splitlines()[0] if str(e) else e}); re-run the same command to resume') from None

    def barrier(self, what: str = 'waiting for the other ranks') -> None:
        if self.enabled:
            import torch.distributed as dist

            self._call(what, lambda: dist.monitored_barrier(timeout=_timeout()) if dist.get_backend() == 'gloo'
                       else dist.barrier())

    def gather(self, obj: Any, what: str = 'exchanging results') -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj)
        return out

    def broadcast(self, obj: Any, what: str = 'sharing a result') -> Any:
        """Rank 0's obj on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._call(what, dist.broadcast_object_list, box, 0)
        return box[0]


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get('DVA_DIST_TIMEOUT', 1800)))


def from_env(device: str = 'auto') -> Ranks:
    """The ranks of a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK), with the process group initialised once:
    NCCL when this rank runs on CUDA, else gloo. A single process (no torchrun) gets Ranks()."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    ranks = Ranks(int(os.environ['RANK']), world, int(os.environ.get('LOCAL_RANK', '0')))
    if not dist.is_initialized():
        cuda = device != 'cpu' and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group('nccl' if cuda else 'gloo', timeout=_timeout())
    return ranks


def rank_device(device: str, ranks: Ranks) -> str:
    """Each rank its own device: 'auto'/'cuda' -> cuda:LOCAL_RANK under torchrun."""
    if ranks.enabled and device in ('auto', 'cuda'):
        import torch

        if torch.cuda.is_available():
            return f'cuda:{ranks.local_rank}'
    return device


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
