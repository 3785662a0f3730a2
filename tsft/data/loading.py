"""The training data loader every family uses: shuffled by (seed, epoch) alone, and resumable mid-epoch.

Lightning saves a loader's ``state_dict`` in each checkpoint when the loader has one (its ``_Stateful``
protocol) and hands it back on resume; without one, a run resumed from a mid-epoch checkpoint (a step
interval, SIGTERM) replays the epoch's first batches. Here the state is how many batches of the epoch the
training loop has processed, and a resumed loader starts after them, so the resumed run sees the same batches
in the same order as an uninterrupted one.

On one device this is exact; under DDP Lightning wraps the sampler per rank, and the skip counts batches of
the whole epoch's order (a resume from an epoch-end checkpoint is exact there too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch); ``skip_next`` drops the first indices
    of the next pass (a resumed epoch).

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from an end-of-epoch checkpoint sees
    the same order as an uninterrupted one.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        self._skip = count

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        # The full epoch even while skipping: Lightning counts the epoch's batches from the loader's length
        # and continues its batch count from the checkpoint's, so a resumed epoch still ends at that length.
        return self.size


class ResumableLoader(DataLoader):
    """A DataLoader whose state is the batches processed in the current epoch; on load it makes its
    EpochSeededSampler skip them. ``batches_done`` reads that count from the training loop (the loader itself
    cannot tell a batch prefetched from one trained on). The signature keeps DataLoader's ``sampler`` so that
    Lightning can swap in its per-rank sampler under DDP."""

    def __init__(self, dataset: Sequence[Any], *, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        done = int(state.get("batches_done", 0))
        batches_per_epoch = -(-len(self.dataset) // self.batch_size)
        if 0 < done < batches_per_epoch and isinstance(self.sampler, EpochSeededSampler):
            self.sampler.skip_next(done * self.batch_size)  # mid-epoch; after an epoch's end the next starts afresh


def training_loader(
    dataset: Sequence[Any], *, batch_size: int, seed: int, collate_fn: Callable[[list[Any]], Any], datamodule: Any
) -> ResumableLoader:
    """The training loader of ``datamodule`` (a LightningDataModule: its Trainer counts the batches done)."""

    def batches_done() -> int:
        trainer = getattr(datamodule, "trainer", None)
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    return ResumableLoader(
        dataset,
        batches_done=batches_done,
        batch_size=batch_size,
        sampler=EpochSeededSampler(len(dataset), seed),
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
    )
