"""Masks under DistributedDataParallel: gloo backend, 2 processes on this machine."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

# Opt-in: on this 2-core CI machine kind, gloo sometimes aborts a worker while tearing its threads down
# after the test body has finished ("terminate called without an active exception"), which would make
# CI flaky for reasons outside sparseprune. Run with SPARSEPRUNE_TEST_DDP=1.
pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.skipif(os.environ.get("SPARSEPRUNE_TEST_DDP") != "1", reason="opt-in: SPARSEPRUNE_TEST_DDP=1"),
]


def _worker(rank, world, init_file, out_dir, criterion):
    torch.set_num_threads(1)
    from sparseprune.prune import masks
    from sparseprune.prune.patterns import prune_blocks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        g = torch.Generator().manual_seed(100 + rank)  # each rank has its own data
        x = torch.randn(64, 16, generator=g) * (1 + 3 * rank)
        y = torch.randint(0, 4, (64,), generator=g)
        if criterion == "wanda":
            prune_blocks(model, 0.5, (4, 4), importance="wanda", example_inputs=x)  # masks differ per rank...
            masks.sync_masks(model)                                                 # ...until synced
        else:
            prune_blocks(model, 0.5, (4, 4))
        keep = {n: masks.get_mask(m).clone() for n, m in masks.masked_modules(model)}
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2, weight_decay=1e-2)
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        ok = all(bool((m.weight[~keep[n]] == 0).all()) for n, m in masks.masked_modules(model))
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        mflat = torch.cat([k.flatten().float() for k in keep.values()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        mg = [torch.zeros_like(mflat) for _ in range(world)]
        dist.all_gather(mg, mflat)
        agree = all(torch.equal(gathered[0], t) for t in gathered) and all(torch.equal(mg[0], t) for t in mg)
        sparsity = masks.sparsity(model, only_masked=True)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{int(ok)} {int(agree)} {sparsity}\n")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_masks_survive_ddp_and_ranks_agree(tmp_path, criterion):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), criterion), nprocs=2, join=True)
    for r in range(2):
        ok, agree, sparsity = open(tmp_path / f"rank{r}.txt").read().split()
        assert ok == "1", f"rank {r}: a pruned weight came back"
        assert agree == "1", f"rank {r}: ranks disagree on weights or masks"
        assert float(sparsity) == pytest.approx(0.5, abs=16 / (16 * 32))
