"""Parallelism applied to a model from outside (torchtitan style): activation checkpointing and torch.compile per
block, then DDP or FSDP2 (``fully_shard`` per block, then the root) with an optional bf16 mixed-precision policy.

Blocks are the children of every ``nn.ModuleList`` in the model (transformer layers of the LLM and the ViT, the
flow head's blocks, the VAE decoder's stages): the model needs no hook for this and knows nothing of it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["parallelize", "find_blocks", "resolve_mode", "autocast_context"]


def find_blocks(model: nn.Module) -> list:
    """[(parent ModuleList, index, block)] for every child of every ModuleList, outermost lists first; a block
    inside another block is not listed separately, nor anything inside a module whose class sets
    ``parallel_atomic = True`` (a small network whose lists hold layers, not blocks: the head's conv stage)."""
    out, seen = [], set()
    for name, mod in model.named_modules():
        if getattr(type(mod), "parallel_atomic", False):
            seen.add(name)
            continue
        if not isinstance(mod, nn.ModuleList):
            continue
        if any(name.startswith(s + ".") for s in seen):
            continue
        for i, child in enumerate(mod):
            if any(p.requires_grad for p in child.parameters()):
                out.append((mod, i, child))
                seen.add(f"{name}.{i}" if name else str(i))
    return out


def resolve_mode(mode: str, world_size: int) -> str:
    return ("ddp" if world_size > 1 else "none") if mode == "auto" else mode


def parallelize(model: nn.Module, pcfg, dist, fsdp_units=None) -> nn.Module:
    """Wrap `model` (already on its device) as `pcfg` says; returns the module to call (the bare model for
    mode none, else its DDP / FSDP2 form).

    fsdp_units: the modules that get their own FSDP2 unit (all-gathered just before they run, resharded after),
    default every block.  FSDP2 issues a unit's all-gather when the unit runs, so a unit that one rank skips for
    its data (the flow head in a micro-batch without an image to generate) would hang the others: only modules that
    run in every micro-batch on every rank may be units (the recipe says which, ``Recipe.fsdp_units``); the rest
    belongs to the root unit, gathered once per forward, with zero gradients reduce-scattered for parameters a rank
    did not use (``set_reduce_scatter_unused_params``, FSDP2's counterpart of DDP's find_unused_parameters)."""
    mode = resolve_mode(pcfg.mode, dist.world_size)
    blocks = find_blocks(model)
    if pcfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for parent, i, block in blocks:
            parent[i] = checkpoint_wrapper(block)
        blocks = [(parent, i, parent[i]) for parent, i, _ in blocks]
    if pcfg.compile:
        for _, _, block in blocks:
            block.compile()
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not dist.distributed:
            raise ValueError("parallel.mode = 'ddp' needs several processes (start with torchrun --nproc-per-node N)")
        # a micro-batch without an image to generate (or to understand) leaves the head (or the ViT) unused
        return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                   find_unused_parameters=True)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = dist.mesh
        if mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            if not torch.distributed.is_initialized():
                raise ValueError("parallel.mode = 'fsdp' needs a process group (start with torchrun, even with "
                                 "--nproc-per-node 1)")
            mesh = init_device_mesh(dist.device.type, (dist.world_size,), mesh_dim_names=("dp",))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if pcfg.mixed_precision == "bf16" else MixedPrecisionPolicy()
        units = [b for _, _, b in blocks] if fsdp_units is None else list(fsdp_units)
        if pcfg.activation_checkpointing and fsdp_units is not None:   # the wrappers replaced the listed blocks
            wrapped = {id(getattr(b, "_checkpoint_wrapped_module", b)): b for _, _, b in blocks}
            units = [wrapped.get(id(u), u) for u in units]
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.set_reduce_scatter_unused_params(True)
        return model
    raise ValueError(f"parallel.mode = {mode!r}: use 'auto', 'none', 'ddp' or 'fsdp'")


def autocast_context(pcfg, mode: str, device: torch.device):
    """bf16 autocast for mixed precision without FSDP2 (FSDP2 casts the parameters itself)."""
    if pcfg.mixed_precision == "bf16" and mode != "fsdp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
