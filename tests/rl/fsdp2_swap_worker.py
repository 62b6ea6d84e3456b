"""One process of tests/rl/test_fsdp2.py's swap test (torch.multiprocessing.spawn; light imports only).

A small model sharded by fully_shard over 2 gloo processes, its copies made by weight_copies.clone
(on the device and in host memory), updated by lerp_ and swapped in by core.policies.policy.swapped_weights:
every forward is compared with an unsharded model holding the same values.
"""
import json
import os

import torch
import torch.distributed as dist
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))  # 7 and 3 rows: uneven shards over 2


def work(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from core.policies.policy import swapped_weights
    from rl.algorithms.weight_copies import clone, lerp_, local_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plain, model = _model(), _model()
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model, reshard_after_forward=True)
        params = dict(model.named_parameters())
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
        results, scale = {}, 1.0
        for where in ("device", "cpu"):
            copy = clone(params, where)
            with torch.no_grad():
                for p in params.values():  # the trained weights move on; the copy follows half-way
                    p.to_local().mul_(1.5)
            lerp_(copy, params, 0.5)  # copy = (w + 1.5 w) / 2 = 1.25 w, on the local shards
            expected_model = _model()
            with torch.no_grad():
                for p in expected_model.parameters():
                    p.mul_(1.25 * scale)
                with swapped_weights(model, copy):
                    swapped = model(x)
                after = model(x)
                for p in plain.parameters():
                    p.mul_(1.5)
                results[where] = [float((swapped - expected_model(x)).abs().max()),
                                  float((after - plain(x)).abs().max())]
            scale *= 1.5
        results["bytes"] = local_bytes(copy)
        results["type"] = type(copy["0.weight"]).__name__
        results["shard_device"] = str(copy["0.weight"].to_local().device)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
