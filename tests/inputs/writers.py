"""Checkpoints written by the real tools, each in a process of its own (their global state stays out of the tests).

``python -m tests.inputs.writers distcp WEIGHTS OUT``: the tiny MLP whose weights are in WEIGHTS (safetensors),
sharded by FSDP2 over 2 gloo processes, saved with ``torch.distributed.checkpoint`` as Accelerate's FSDP
``save_state`` does (``{"model": ...}``), with the Adam state beside it (``{"optim": ...}``).
``python -m tests.inputs.writers accelerate WEIGHTS PROJECT``: ``Accelerator.save_state`` twice with automatic
checkpoint naming (``PROJECT/checkpoints/checkpoint_0`` and ``_1``), the second after one SGD step.
"""

import sys
import tempfile

import torch
from torch import nn


def mlp(weights: str) -> nn.Module:
    from safetensors.torch import load_file

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    net.load_state_dict(load_file(weights))
    return net


def _shard_and_save(rank: int, world: int, store: str, weights: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net = mlp(weights)
    fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.Adam(net.parameters())
    net(torch.zeros(1, 3)).sum().mul(0).backward()  # zero gradients: Adam's state exists, the weights stay
    opt.step()
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=out)
    dist.destroy_process_group()


def distcp(weights: str, out: str) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_shard_and_save, args=(2, f"{tmp}/store", weights, out), nprocs=2, start_method="fork")


def accelerate(weights: str, project: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=project,
                                                                    automatic_checkpoint_naming=True))
    net = mlp(weights)
    net, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.5))
    acc.save_state()
    net(torch.ones(2, 3)).sum().backward()
    opt.step()
    acc.save_state()


if __name__ == "__main__":
    {"distcp": distcp, "accelerate": accelerate}[sys.argv[1]](*sys.argv[2:])
