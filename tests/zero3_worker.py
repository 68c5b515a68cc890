"""Run by test_recipes.py under torchrun (2 CPU processes, gloo) when DeepSpeed is installed: a tiny FAM model with
LoRA and a trainable FAM prompt under DeepSpeed ZeRO-3 (every parameter partitioned: persistence threshold 0), one
training step per line of ORDERS (loop orders). Prints, per step, the largest relative difference between the full
gradients and those of the unsharded model on the same two batches, and the all-gathers of the step's forward pass.
REUSE sets `stage3_max_reuse_distance`: between one decoder layer's parameters (37,504 here, with LoRA) and the
model's, as for a large model under the default of 1e9, ZeRO-3 keeps a parameter gathered only when the same layer
runs again soon, which the layer-major order does."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


sys.path.insert(0, str(Path(__file__).parent))
from conftest import random_ids  # noqa: E402
from fsdp2_worker import build  # noqa: E402

gathers = []
_all_gather_into_tensor = dist.all_gather_into_tensor  # what DeepSpeed's torch backend captures when it starts


def _counting(*args, **kwargs):
    gathers.append(1)
    return _all_gather_into_tensor(*args, **kwargs)


dist.all_gather_into_tensor = _counting


def main():
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fam, model = build()
    _, reference = build()
    for r in range(world):
        ids = random_ids(1, 40, seed=r)
        (reference(input_ids=ids, labels=ids).loss / world).backward()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_reuse_distance": int(os.environ.get("REUSE", "45000")),
        },
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=0.0), config=config)
    ids = random_ids(1, 40, seed=rank)
    for step, order in enumerate(os.environ.get("ORDERS", "auto,auto,block,block,block").split(",")):
        fam.config.loop_order = order
        gathers.clear()
        loss = engine(input_ids=ids, labels=ids).loss
        forward_gathers = len(gathers)
        engine.backward(loss)
        worst = 0.0
        for (_, parameter), (_, expected) in zip(engine.module.named_parameters(), reference.named_parameters()):
            if parameter.requires_grad:
                grad = safe_get_full_grad(parameter)  # collective: every rank asks for every parameter
                worst = max(worst, ((grad - expected.grad).abs().max() / expected.grad.abs().max()).item())
        engine.step()  # lr 0: the weights stay; the gradients are cleared
        print(
            f"rank={rank} step={step} order={order} layer_major={fam._runs_layer_major()} "
            f"worst_relative_difference={worst:.3g} forward_all_gathers={forward_gathers}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
