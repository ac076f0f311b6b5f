"""The loader's cross-epoch stream (one set of workers per run) and its data-parallel sharding."""
from __future__ import annotations

import itertools

import torch

import fixtures_images as fx
from pipelines.augment import TwoViewAugment
from pipelines.datasets import DataError, ImageFolder
from pipelines.torch_loader import TwoViewLoader

S = 16


def _indices(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def test_stream_equals_epochs_back_to_back_and_resumes_mid_epoch(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    loader = TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=4, workers=2, seed=3)
    per_epoch = [list(loader.epoch_batches(e)) for e in range(3)]
    expected = [b for epoch in per_epoch for b in epoch]
    streamed = list(itertools.islice(loader.stream(0, 0), len(expected)))
    assert _indices(streamed) == _indices(expected)
    for got, want in zip(streamed, expected):
        torch.testing.assert_close(got["view1"], want["view1"], rtol=0, atol=0)
        assert (got["epoch"], got["batch_index"]) == (want["epoch"], want["batch_index"])
    # resuming at (epoch 1, batch 1) continues with exactly the same batches
    resumed = list(itertools.islice(loader.stream(1, 1), 3))
    assert _indices(resumed) == _indices(expected[len(per_epoch[0]) + 1:][:3])


def test_ranks_see_disjoint_shards_that_cover_the_global_batches(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    augment = TwoViewAugment.sim(size=S)
    single = TwoViewLoader(ds, augment, batch_size=4, seed=1)
    ranks = [TwoViewLoader(ds, augment, batch_size=2, seed=1, rank=r, world_size=2)
             for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == single.batches_per_epoch
    for epoch in range(2):
        whole = list(single.epoch_batches(epoch))
        shards = [list(r.epoch_batches(epoch)) for r in ranks]
        for k, global_batch in enumerate(whole):
            a, b = shards[0][k], shards[1][k]
            assert not set(a["index"].tolist()) & set(b["index"].tolist())
            assert a["index"].tolist() + b["index"].tolist() == global_batch["index"].tolist()
            # the augmentation of a sample does not depend on the number of ranks
            torch.testing.assert_close(torch.cat([a["view2"], b["view2"]]), global_batch["view2"],
                                       rtol=0, atol=0)


def test_sharded_batch_larger_than_dataset_names_ranks(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    try:
        TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=len(ds) // 2 + 1, rank=0,
                      world_size=2)
    except DataError as err:
        assert "2 ranks" in str(err) and "--batch-size" in str(err)
    else:
        raise AssertionError("expected a DataError")
