"""2-process gloo: EMA codebooks stay identical across ranks and equal a single process on the concatenated data."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch

from conftest import free_port, run_spawned_ranks


def _batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(64, 6, generator=g) + (rank * 2.0)


def _worker(rank: int, port: int, out_dir: str, kwargs: dict) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import torch.distributed as dist

        import mimfast

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))  # fmt: skip
        torch.manual_seed(0)  # same initial codebook on both ranks
        vq = mimfast.VectorQuantizer(6, 16, decay=0.8, **kwargs)
        torch.manual_seed(100 + rank)  # different sampling streams: only broadcasts can keep ranks identical
        for step in range(5):
            vq(_batch(rank, step))
        torch.save({k: v.clone() for k, v in vq.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run(tmp_path, kwargs):
    port = free_port()
    run_spawned_ranks(_worker, lambda r: (r, port, str(tmp_path), kwargs), tmp_path)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_codebooks_identical_across_ranks(tmp_path):
    s0, s1 = _run(tmp_path, dict(kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2.0))
    for key in ("embed", "cluster_size", "embed_avg"):
        assert torch.equal(s0[key], s1[key]), key


def test_two_ranks_equal_one_process_on_concatenated_batches(tmp_path):
    s0, _ = _run(tmp_path, {})
    import mimfast

    torch.manual_seed(0)
    vq = mimfast.VectorQuantizer(6, 16, decay=0.8, sync_codebook=False)
    for step in range(5):
        vq(torch.cat([_batch(0, step), _batch(1, step)]))
    for key in ("embed", "cluster_size", "embed_avg"):
        torch.testing.assert_close(s0[key], vq.state_dict()[key], rtol=1e-5, atol=1e-5)
