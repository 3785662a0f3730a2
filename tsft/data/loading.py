"""The training data loader every family uses: shuffled by (seed, epoch) alone, and resumable mid-epoch.

Lightning saves a loader's ``state_dict`` in each checkpoint when the loader has one (its ``_Stateful``
protocol) and hands it back on resume; without one, a run resumed from a mid-epoch checkpoint (a step
interval, SIGTERM) replays the epoch's first batches. Here the state is how many batches of the epoch the
training loop has processed, and a resumed loader starts after them, so the resumed run sees the same batches
in the same order as an uninterrupted one.

The skip is taken from the loader's own batches (each rank skips the batches it trained on), so it holds under
DDP too, where Lightning wraps the sampler per rank. The skipped batches are read and dropped: a resume costs
their loading, never their training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` before each epoch, so every epoch's order is fixed by the seed alone, and a
    resumed run sees the same order as an uninterrupted one.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A DataLoader whose state is the batches processed in the current epoch; after ``load_state_dict`` its next
    pass starts after them. ``batches_done`` reads that count from the training loop (the loader itself cannot
    tell a batch prefetched from one trained on). The signature keeps DataLoader's, so that Lightning can swap
    in its per-rank sampler under DDP."""

    def __init__(self, dataset: Sequence[Any], *, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.batches_done = batches_done
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        done = int(state.get("batches_done", 0))
        self._skip = done if 0 < done < len(self) else 0  # after an epoch's end the next one starts afresh

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()

        def resumed() -> Iterator[Any]:
            # Lazy: Lightning makes the first iterator before it restores the checkpoint (and so this state), and
            # draws from it only afterwards.
            skip, self._skip = self._skip, 0
            for _ in range(skip):
                next(batches)
            yield from batches

        return resumed()


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
