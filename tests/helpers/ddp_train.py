"""`melanoma` CLI entry point for the distributed-training test: records which training samples each process loads.

Run as ``python ddp_train.py train ...``; Lightning's launcher starts the other ranks with the same command line, so
every process applies the same patch. Each process appends to ``$SEEN_DIR/rank-<LOCAL_RANK>.txt``: a line
``epoch`` whenever the training sampler starts an epoch, then one line per training sample index it loads.
"""
import os
import sys
from pathlib import Path

from torch.utils.data import RandomSampler

import melanoma.train.distributed as distributed
import melanoma.train.loop as loop
from melanoma.cli.main import main

SEEN = Path(os.environ["SEEN_DIR"]) / f"rank-{os.environ.get('LOCAL_RANK', '0')}.txt"


def _record(line: str) -> None:
    with open(SEEN, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


_getitem = loop.ArrayDataset.__getitem__
_iterate = distributed.ShardedBatchSampler.__iter__


def getitem(self, index):
    if self.transform is not None:  # the training set (validation has no augmentation)
        _record(str(int(index)))
    return _getitem(self, index)


def iterate(self):
    if isinstance(self.sampler, RandomSampler):
        _record("epoch")
    return _iterate(self)


loop.ArrayDataset.__getitem__ = getitem
distributed.ShardedBatchSampler.__iter__ = iterate

if __name__ == "__main__":
    sys.exit(main())
