"""Seeing through data-parallel wrappers: the model inside DDP, and whether FSDP2 sharded it.

The model layer (``logprobs``, ``critic``) needs these to reach the Hugging Face model's own
attributes whether or not ``wrap_training_state`` (``rlprim.distributed``) wrapped it; they
live here, below the loop layer, so imports run one way. ``rlprim.distributed`` re-exports
both names (``rp.unwrap_model``, ``rp.is_fsdp_module``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap_model", "is_fsdp_module"]


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel`` wrappers (nested ones too); else ``model``.

    rlprim's functions call it before reaching the Hugging Face model's own attributes
    (``config``, ``base_model``, ``generate``, ``state_dict`` keys without ``module.``).
    """
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def is_fsdp_module(model: Any) -> bool:
    """True when ``model`` was sharded with FSDP2 ``fully_shard`` (``wrap_training_state(...,
    strategy="fsdp")``).

    FSDP2 changes the module's class in place (no wrapper): its parameters are ``DTensor``
    shards, and a forward all-gathers them, unit by unit.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)
