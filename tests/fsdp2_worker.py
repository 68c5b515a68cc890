"""Run by test_recipes.py under torchrun (2 CPU processes, gloo): a tiny FAM model with LoRA and a trainable FAM
prompt, sharded with torch's FSDP2 (`fully_shard` per decoder layer, then the whole model, as accelerate's FSDP2
config does), activation checkpointing on, one forward/backward on each process's own batch, in each loop order.
Prints, per order, the largest relative difference between the sharded gradients and those of the unsharded model on
the same two batches, the all-gathers of one forward pass (40 tokens, 5 blocks of 8), the all-gathers and
reduce-scatters of one backward pass (and whether every layer is sharded again after it), and the difference after
two micro-batches of gradient accumulation (layer-major)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


sys.path.insert(0, str(Path(__file__).parent))
from conftest import random_ids, tiny_base  # noqa: E402

import hf_fam  # noqa: E402


def build():
    from peft import LoraConfig, get_peft_model

    from hf_fam.training import fam_module_names

    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, memory_segments=1, fam_length=2)
    torch.manual_seed(1)
    for name in fam_module_names(fam):
        for parameter in fam.get_submodule(name).parameters():
            parameter.data.normal_()
    torch.manual_seed(2)
    config = LoraConfig(r=4, target_modules="all-linear", modules_to_save=fam_module_names(fam), init_lora_weights=False)
    return fam, get_peft_model(fam, config).train()


def count_calls(module, name: str) -> list:
    """Replace `module.name` by a wrapper that appends to the returned list at every call."""
    calls, original = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counting)
    return calls


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    fam, model = build()
    fam.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    no_split = set(fam._no_split_modules)
    layers = [module for module in fam.modules() if type(module).__name__ in no_split]
    for module in layers:
        fully_shard(module, mesh=mesh)
    wrapped = len(layers)
    fully_shard(model, mesh=mesh)

    _, reference = build()
    for r in range(world):
        ids = random_ids(1, 40, seed=r)
        (reference(input_ids=ids, labels=ids).loss / world).backward()

    # what FSDP2's default all-gather and reduce-scatter call, counted
    gathers, reductions = count_calls(dist, "all_gather_single"), count_calls(dist, "reduce_scatter_single")
    ids = random_ids(1, 40, seed=rank)
    worst, backward_gathers, backward_reductions, resharded = {}, {}, {}, {}
    trainable = sum(1 for p in model.parameters() if p.requires_grad)

    def worst_difference(scale=1.0):
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        return max(
            ((grads[n] - scale * p.grad).abs().max() / (scale * p.grad).abs().max()).item()
            for n, p in reference.named_parameters()
            if p.requires_grad
        )

    for order in ("block", "layer"):
        fam.config.loop_order = order
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        gathers.clear()
        reductions.clear()
        loss.backward()
        backward_gathers[order], backward_reductions[order] = len(gathers), len(reductions)
        resharded[order] = all(
            group.is_sharded for layer in layers for group in layer._get_fsdp_state()._fsdp_param_groups
        )
        worst[order] = worst_difference()
    # Gradient accumulation as accelerate does it for FSDP2 (no gradient sync but on the last micro-batch), layer-major:
    # the user's setting holds through hf_fam's own (the same batch twice gives twice the gradients).
    fam.config.loop_order = "layer"
    model.zero_grad()
    model.set_requires_gradient_sync(False)
    model(input_ids=ids, labels=ids).loss.backward()
    model.set_requires_gradient_sync(True)
    model(input_ids=ids, labels=ids).loss.backward()
    worst["accumulated"] = worst_difference(2.0)
    # After the training steps: following a no-grad forward, FSDP2 gives the next backward wrong gradients for the root
    # module's own parameters (a plain transformers Llama too, checked by hand), so the forwards come last.
    for order in ("block", "layer"):
        fam.config.loop_order = order
        with torch.no_grad():
            model(input_ids=ids)  # gathers the root's parameters, which stay gathered
            gathers.clear()
            model(input_ids=ids)
        print(
            f"rank={rank} order={order} wrapped_layers={wrapped} trainable={trainable} "
            f"worst_relative_difference={worst[order]:.3g} forward_all_gathers={len(gathers)} "
            f"backward_all_gathers={backward_gathers[order]} backward_reduce_scatters={backward_reductions[order]} "
            f"resharded_after_backward={resharded[order]} "
            f"accumulated_worst_relative_difference={worst['accumulated']:.3g}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
