"""Data-parallel training on ``torch.distributed``: launch, wrap, shard, reduce.

Launch any rlprim training script with ``torchrun --nproc_per_node N script.py``; in the script
call ``init_distributed()`` and ``wrap_training_state(state)`` once, then ``train`` /
``training_iteration`` exactly as in one process. Without ``torchrun`` both calls are no-ops,
so the same script runs on a laptop.

What happens under ``N > 1`` ranks (``is_distributed()``):

* **Prompts.** ``training_iteration`` receives the *global* list of ``P`` prompts; rank ``r``
  keeps the contiguous share ``shard_prompts(prompts, r, N)`` (sizes differ by at most one, the
  first ``P mod N`` ranks take one more). A prompt is a group: its ``G`` samples stay on one
  rank, so group-relative advantages need no communication. Group ids stay global.
* **Sampling.** Rank ``r`` samples with ``rank_seed(seed, r) = seed + 1_000_003·r``, so ranks
  never draw the same random stream.
* **Advantages and batch statistics.** The rewards, completion masks (and, when present, the
  critic's values and the per-token KL) of all ranks are gathered in rank order — which is the
  single-process batch order — and the advantage function runs on that global batch; each rank
  keeps its rows. So batch-level statistics (GRPO ``scale="batch"``, REINFORCE++ whitening,
  PPO's advantage whitening, a custom ``advantage_fn``) are those of the global batch. Reward
  mean/std, KL, response length, token and sequence counts in ``TrainingStats`` are global and
  identical on every rank; the adaptive KL controller sees the global KL, so β is too.
  Dynamic sampling (DAPO) re-samples per rank, as often as that rank needs; its
  ``dynamic_sampling/*`` statistics are the job's (groups summed, rounds the slowest rank's).
* **Loss normalisation.** Each micro-batch loss is weighted by its share of the *global*
  normaliser (``microbatch_loss_weights(..., global_totals=...)``): with ``token-mean`` the
  gradient is that of ``Σ_{all ranks' tokens} l_t / N_global`` — not a mean of rank means.
* **Gradients.** Every backward pass runs locally (inside ``no_sync``); then one bucketed
  ``all_reduce(SUM)`` per optimizer step (``synchronize_gradients``) gives every rank the
  gradient of the global loss. This is what DDP's reducer computes, but done once per step after
  all micro-batches, so ranks may hold different numbers of micro-batches (even none), and a
  non-finite loss on one rank makes *every* rank skip the update, without any rank waiting on a
  collective the others never reach. The DDP wrapper (``wrap_training_state``) broadcasts rank
  0's weights at wrap time and is what users' own code sees; rlprim's functions unwrap it
  (``unwrap_model``) to reach the Hugging Face model for log-probs, values and ``generate``.
* **Checkpoints.** ``save_checkpoint`` gathers every rank's RNG state, rank 0 writes, all ranks
  wait for it; ``load_checkpoint`` is called on every rank (a shared filesystem is assumed).
* **FSDP2** (``wrap_training_state(state, strategy="fsdp")``). The policy's (and critic's)
  weights, gradients and optimizer moments are sharded over the ranks (``fully_shard`` per transformer block plus
  the root). Everything above holds, with three differences: gradients are reduce-scattered
  (summed) by FSDP in each backward instead of ``synchronize_gradients``; forwards whose
  number differs by rank (sampling, evaluation, no-grad log-prob passes) run inside
  ``gathered_parameters``, and ``training_step`` pads every rank to the same number of
  micro-batches with zero-loss passes; checkpoints gather the full weights and moments
  (``full_state_dict``) and are the files one process writes, so they load with or without
  FSDP, on any number of ranks.
* **Failure.** A rank that raises exits non-zero and ``torchrun`` stops the others; a rank
  blocked in a collective on a dead or stuck peer gets an error after ``timeout``
  (``DEFAULT_TIMEOUT`` = 10 minutes, as for NCCL; gloo notices a peer's closed socket at once).

The loop reaches all of this through one argument: ``create_torch_data_parallel()`` bundles
these collectives into a ``DataParallel``, which ``train``, ``training_iteration`` and each of
its phases take as ``data_parallel`` (``None`` picks it under ``torchrun`` and the
single-process identities otherwise, ``current_data_parallel``).

References: PyTorch ``DistributedDataParallel`` (Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training"); FSDP2 ``fully_shard``.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from rlprim.model_wrappers import is_fsdp_module, unwrap_model
from rlprim.types import TrainingState

__all__ = [
    "DEFAULT_TIMEOUT",
    "RANK_SEED_STRIDE",
    "DistributedInfo",
    "init_distributed",
    "destroy_distributed",
    "distributed_context",
    "get_distributed_info",
    "is_distributed",
    "is_main_process",
    "barrier",
    "shard_bounds",
    "shard_prompts",
    "rank_seed",
    "wrap_training_state",
    "unwrap_model",
    "is_fsdp_module",
    "gathered_parameters",
    "full_state_dict",
    "load_full_state_dict",
    "model_class",
    "copy_into",
    "no_sync",
    "broadcast_module",
    "all_reduce_scalars",
    "all_gather_objects",
    "gather_rows",
    "synchronize_gradients",
    "DataParallel",
    "create_single_process_parallel",
    "create_torch_data_parallel",
    "current_data_parallel",
]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
RANK_SEED_STRIDE = 1_000_003  # a prime: seeds of rank r and iteration i collide only after 10^6 its
_GRADIENT_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size
_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class DistributedInfo(NamedTuple):
    """Where this process stands in the job.

    Fields:
      rank: global rank in ``[0, world_size)``.
      world_size: number of processes (1 when not distributed).
      local_rank: rank on this machine (the GPU index with NCCL).
      backend: ``"gloo"``, ``"nccl"``, … or ``None`` when no process group exists.
      device: the device this rank computes on (``cuda:<local_rank>`` with NCCL, else CPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")


def _single_process_info() -> DistributedInfo:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return DistributedInfo(device=device)


# --------------------------------------------------------------------------- process group


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from error


def _check_timeout(timeout: Any) -> datetime.timedelta:
    if isinstance(timeout, bool):
        raise TypeError(f"timeout must be a timedelta or seconds, got {timeout!r}")
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=timeout)
    if not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"timeout must be a timedelta or seconds, got {type(timeout).__name__}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return timeout


def get_distributed_info() -> DistributedInfo:
    """The current ``DistributedInfo``; ``(0, 1, 0, None, cuda:0 or cpu)`` without a group.

    ``local_rank`` comes from ``LOCAL_RANK`` (set by ``torchrun``), defaulting to the rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return _single_process_info()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = str(dist.get_backend())
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
    return DistributedInfo(rank, world_size, local_rank, backend, device)


def init_distributed(
    backend: str | None = None, timeout: datetime.timedelta | float = DEFAULT_TIMEOUT
) -> DistributedInfo:
    """Joins the process group ``torchrun`` set up in the environment; a no-op without one.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    Backend: ``"nccl"`` when CUDA is available (and ``torch.cuda.set_device(local_rank)``),
    else ``"gloo"``. Idempotent: when a process group exists it is described and left alone.
    Without ``RANK`` / ``WORLD_SIZE`` in the environment (a plain ``python script.py``)
    nothing is initialised and ``DistributedInfo(rank=0, world_size=1, backend=None)`` (device
    ``cuda:0`` when CUDA is available, else CPU) is returned, so a
    script runs the same with and without ``torchrun``.

    Every collective of the group gives up after ``timeout`` (default ``DEFAULT_TIMEOUT``,
    10 minutes): a rank waiting for a peer that hangs gets an error instead of hanging forever.
    Raise it when ranks legitimately wait long for each other (very uneven generation).

    Args:
      backend: ``None`` (automatic), ``"gloo"`` or ``"nccl"`` (any backend torch knows).
      timeout: a ``timedelta`` or seconds.
    Returns:
      this process's ``DistributedInfo``.
    """
    timeout = _check_timeout(timeout)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if not dist.is_available():
        return _single_process_info()
    if dist.is_initialized():
        return get_distributed_info()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return _single_process_info()
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA, which is not available; use 'gloo'")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return get_distributed_info()


def destroy_distributed() -> None:
    """Leaves and destroys the process group (``destroy_process_group``); a no-op without one.

    Call it once at the end of a ``torchrun`` job (``distributed_context`` does it for you);
    afterwards ``get_distributed_info()`` reports a single process again.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_context(
    backend: str | None = None, timeout: datetime.timedelta | float = DEFAULT_TIMEOUT
) -> Iterator[DistributedInfo]:
    """``with distributed_context() as info:`` — ``init_distributed`` then, on exit (also on an
    exception), ``destroy_distributed`` if this context created the group.

    On a normal exit the ranks first meet at a ``barrier``, so none tears its group down while
    a peer is still finishing a collective with it. Without ``torchrun`` it yields the
    single-process ``DistributedInfo`` and does nothing else, so the same script runs as one
    process or as N ranks."""
    created = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(backend, timeout)
    try:
        yield info
    except BaseException:
        if created:
            destroy_distributed()  # no barrier: the other ranks may never get there
        raise
    if created:
        barrier()
        destroy_distributed()


def is_distributed() -> bool:
    """True when a process group with more than one rank exists (rlprim then shards and reduces).

    With one rank (``torchrun --nproc_per_node 1``) everything runs the single-process path.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the rank that logs and writes files.

    ``train`` logs and shows its progress bar on this rank only; ``save_checkpoint`` writes
    from it while the other ranks send their RNG states and wait.
    """
    return get_distributed_info().rank == 0


def barrier() -> None:
    """Waits until every rank got here (``dist.barrier``); a no-op when not distributed.

    Use it before a rank reads or deletes what another rank writes (e.g. a scratch directory).
    It gives up after the group's timeout (``init_distributed(timeout=...)``).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    return get_distributed_info().device


# --------------------------------------------------------------------------- sharding and seeds


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    return rank, world_size


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``num_items`` items.

    ``q, m = divmod(n, N)``; rank ``r`` gets ``q + 1`` items when ``r < m``, else ``q``, and
    ``start = r·q + min(r, m)``. The shares tile ``[0, n)`` in rank order, so concatenating the
    ranks' results in rank order gives the single-process order.

    Raises:
      ValueError: when ``num_items < world_size`` (a rank would have nothing to train on).
    """
    rank, world_size = _check_rank(rank, world_size)
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise ValueError(f"num_items must be an int >= 0, got {num_items!r}")
    if num_items < world_size:
        raise ValueError(
            f"cannot shard {num_items} prompts over {world_size} ranks: every rank needs at least "
            "one prompt (pass at least world_size prompts per iteration)"
        )
    quotient, remainder = divmod(num_items, world_size)
    start = rank * quotient + min(rank, remainder)
    return start, start + quotient + (1 if rank < remainder else 0)


def shard_prompts(prompts: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s contiguous share of the global prompt list (see ``shard_bounds``).

    Each prompt is one group (its ``G`` samples are drawn on the rank that holds it), so groups
    are never split. Uneven counts: the first ``len(prompts) mod world_size`` ranks take one
    prompt more; the global loss normalisation accounts for the difference. Fewer prompts than
    ranks is a ``ValueError``.

    Args:
      prompts: the global prompt items of one iteration.
      rank, world_size: this rank and the number of ranks.
    Returns:
      ``list(prompts[start:stop])``.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of prompt items, got {type(prompts).__name__}")
    start, stop = shard_bounds(len(prompts), rank, world_size)
    return list(prompts[start:stop])


def rank_seed(seed: int | None, rank: int) -> int | None:
    """The sampling seed of rank ``rank``: ``seed + RANK_SEED_STRIDE · rank`` (``None`` stays).

    Rank 0 keeps ``seed``. ``train`` already adds the iteration to the seed, and the stride
    (1,000,003) keeps ranks' seeds apart for a million iterations.
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    return seed + RANK_SEED_STRIDE * rank


# --------------------------------------------------------------------------- models


@contextlib.contextmanager
def no_sync(*models: Any) -> Iterator[None]:
    """Enter ``model.no_sync()`` of every DDP-wrapped ``model`` (others are skipped).

    Inside, a backward pass through a DDP forward accumulates gradients locally instead of
    all-reducing them; ``synchronize_gradients`` then reduces once per step.
    """
    from torch.nn.parallel import DistributedDataParallel

    with contextlib.ExitStack() as stack:
        for model in models:
            if isinstance(model, DistributedDataParallel):
                stack.enter_context(model.no_sync())
        yield


def broadcast_module(module: nn.Module, src: int = 0) -> nn.Module:
    """Copies rank ``src``'s parameters and buffers into every rank's ``module``, in place.

    Returns ``module``; a no-op when not distributed.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not is_distributed():
        return module
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)
    return module


def _fsdp_units(*models: Any) -> list[nn.Module]:
    units: list[nn.Module] = []
    for model in models:
        if is_fsdp_module(model):
            units += [m for m in model.modules() if is_fsdp_module(m)]
    return units


@contextlib.contextmanager
def gathered_parameters(*models: Any) -> Iterator[None]:
    """Inside the block, FSDP2-sharded ``models`` hold their full weights for forward passes.

    FSDP2 all-gathers a unit's weights at each forward, so every rank must run the same number
    of forwards — which sampling (ranks stop at different lengths, dynamic sampling re-samples
    a different number of rounds) and evaluation do not. Entering all-gathers every unit once
    (``unshard``, collective: every rank enters together) and keeps it gathered
    (``set_reshard_after_forward(False)``); then forwards need no communication and ranks may run
    any number of them. Leaving reshards. Memory: one full copy of the weights while inside.
    Models that are not FSDP2 modules are ignored (a no-op for DDP and one process).
    """
    units = _fsdp_units(*models)
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``unwrap_model(model).state_dict()`` with every ``DTensor`` shard gathered in full.

    For an FSDP2 module this is a collective (every rank must call it, in the same order) and
    every rank gets the full tensors; for any other module it is the plain ``state_dict()``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.distributed.tensor import DTensor

    module = unwrap_model(model)
    state = module.state_dict()
    if not is_fsdp_module(module):
        return state
    # Tied parameters (one Parameter under two names) stay one tensor, as in a plain state_dict.
    parameters = dict(module.named_parameters(remove_duplicate=False))
    gathered: dict[int, torch.Tensor] = {}
    result = {}
    for name, tensor in state.items():
        key = id(parameters.get(name, tensor))
        if key not in gathered:
            gathered[key] = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        result[name] = gathered[key]
    return result


def model_class(model: Any) -> type:
    """The model's own class, as a checkpoint or ``config.architectures`` should name it.

    FSDP2 swaps a module's class for a generated subclass (``Qwen2ForCausalLM`` becomes
    ``FSDPQwen2ForCausalLM``); this returns ``Qwen2ForCausalLM``. DDP wrappers are unwrapped;
    any other module gives ``type(model)``.
    """
    module = unwrap_model(model)
    cls = type(module)
    if is_fsdp_module(module):
        from torch.distributed.fsdp import FSDPModule

        return next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, where ``target`` may be an FSDP2 ``DTensor`` shard.

    ``source`` is the full tensor (``[*shape]``, the global shape of ``target``), held by every
    rank; each rank copies its own slice into its shard, without communication. For a plain
    ``target`` it is ``target.copy_(source)`` (dtype and device converted), under ``no_grad``.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor) and not isinstance(source, DTensor):
            shard = distribute_tensor(
                source.to(device=target.device, dtype=target.dtype), target.device_mesh,
                target.placements, src_data_rank=None,
            )
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(source)


def load_full_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copies full tensors into ``model``'s parameters and buffers, in place.

    The inverse of ``full_state_dict``: for an FSDP2 module each rank keeps its own shard of
    each full tensor (every rank must hold the same ``tensors``; no communication); otherwise
    each tensor is copied in. Keys must match ``model.state_dict()`` exactly (``ValueError``
    before anything is copied); dtypes and devices are converted to the model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    own = unwrap_model(model).state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"tensors do not match the model's state_dict: missing {missing}, unexpected "
            f"{unexpected}"
        )
    for name, target in own.items():
        copy_into(target, tensors[name])


def _fsdp(module: nn.Module) -> nn.Module:
    """FSDP2: every transformer block (``_no_split_modules``) is a unit, the rest the root."""
    from torch.distributed.fsdp import fully_shard

    if is_fsdp_module(module):
        return module
    broadcast_module(module)  # fully_shard keeps each rank's slice of its own tensors
    block_names = set(getattr(module, "_no_split_modules", None) or ())
    for sub in list(module.modules()):
        if sub is not module and type(sub).__name__ in block_names:
            fully_shard(sub)
    fully_shard(module)
    for unit in _fsdp_units(module):
        # Sum, do not average, over ranks: rlprim weights each micro-batch by its share of the
        # global batch (as in the DDP path). Forced SUM also avoids PREMUL_SUM, which gloo lacks.
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_gradient_divide_factor(1.0)
    return module


def _rebuilt_optimizer(
    optimizer: torch.optim.Optimizer,
    old_names: Mapping[int, tuple[str, str]],
    modules: Mapping[str, nn.Module],
) -> torch.optim.Optimizer:
    """The same optimizer class and hyper-parameters over the modules' new (sharded)
    parameters; ``old_names[id(old parameter)] = (module key, parameter name)``."""
    new = {
        (key, name): param
        for key, module in modules.items()
        for name, param in module.named_parameters()
    }
    groups = []
    for group in optimizer.param_groups:
        params = [new[old_names[id(p)]] if id(p) in old_names else p for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    # Every group carries its own hyper-parameters; pass the constructor only what it takes
    # (AdamW's defaults hold keys its __init__ does not accept).
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults)


def _ddp(module: nn.Module, info: DistributedInfo, find_unused_parameters: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return broadcast_module(module)  # DDP refuses a module with nothing to train
    devices = {p.device for p in module.parameters()}
    if len(devices) != 1:
        raise ValueError(
            f"a wrapped module must live on one device, got {sorted(map(str, devices))}"
        )
    device = next(iter(devices))
    if device.type != info.device.type or (
        device.type == "cuda" and device.index not in (None, info.device.index)
    ):
        raise ValueError(
            f"the module is on {device} but rank {info.rank} computes on {info.device}; move it "
            f"there first (model.to(info.device))"
        )
    device_ids = [info.device.index] if device.type == "cuda" else None
    # No buffer sync in every forward (rlprim unwraps and never calls the wrapper's forward);
    # rank 0's parameters and buffers are copied to every rank once, here.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    buffer_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    wrapped = DistributedDataParallel(
        module,
        device_ids=device_ids,
        find_unused_parameters=find_unused_parameters,
        **buffer_sync,
    )
    if not newer:  # broadcast_buffers=False also skips the buffers' sync at construction
        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)
    return wrapped


def wrap_training_state(
    state: TrainingState, strategy: str = "ddp", find_unused_parameters: bool = False
) -> TrainingState:
    """The state with its policy (and critic) wrapped for data-parallel training.

    ``strategy="ddp"``: the policy and the value model become
    ``torch.nn.parallel.DistributedDataParallel`` wrappers; their constructor broadcasts rank 0's
    parameters and buffers, so every rank starts from the same weights. The reference model is
    broadcast from rank 0 too. The modules' parameter tensors are not replaced, so
    ``state.optimizer`` still updates them. rlprim's functions unwrap the wrappers where they
    need the inner model (``get_logprobs``, ``get_values``, generation, checkpoints, reference
    updates) and synchronise gradients themselves, once per step (see the module docstring).

    ``strategy="fsdp"``: the policy is sharded with FSDP2 ``fully_shard`` (Zhao et al. 2023,
    "PyTorch FSDP"): each transformer block (the model's ``_no_split_modules``) is a unit, the
    embeddings, final norm and head the root unit, so each rank stores ``1/N`` of the weights,
    gradients and optimizer moments. The optimizer is rebuilt over the sharded parameters (same
    class, same groups and hyper-parameters; it must not have state yet, and the state must not
    carry a scheduler — build it afterwards). Reductions sum over ranks (the DDP path's
    semantics). rlprim keeps FSDP's collectives in step: sampling, evaluation and no-grad
    log-prob passes run inside ``gathered_parameters`` (weights gathered once, then any number
    of forwards per rank), ``training_step`` runs the same number of micro-batches on every rank
    (padding with zero-weight ones) and log-probs use the model's own forward (its
    ``logits_to_keep``) so the root unit's hooks run. A value model (PPO's critic) is
    sharded the same way, in the same rebuilt optimizer.

    Without a process group (not launched with ``torchrun``) the state is returned unchanged.
    Idempotent: wrapped modules are not wrapped again.

    Args:
      state: a ``TrainingState`` whose models live on this rank's device
        (``get_distributed_info().device``).
      strategy: ``"ddp"`` or ``"fsdp"`` (see above).
      find_unused_parameters: passed to DDP (only matters for users' own DDP forwards).
    Returns:
      ``state._replace(policy=DDP(policy), value_model=DDP(value_model))``, or with
      ``"fsdp"`` the policy and value model sharded in place and the optimizer rebuilt.
    """
    if not isinstance(state, TrainingState):
        raise TypeError(f"state must be a TrainingState, got {type(state).__name__}")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if not isinstance(state.policy, nn.Module):
        raise TypeError(
            f"state.policy must be a torch.nn.Module, got {type(state.policy).__name__}"
        )
    if strategy == "fsdp":
        if state.scheduler is not None:
            raise ValueError(
                "strategy='fsdp' replaces the optimizer (FSDP2 makes new parameters): wrap a "
                "state without a scheduler and build the scheduler on the new state.optimizer"
            )
        if state.optimizer is not None and state.optimizer.state:
            raise ValueError(
                "strategy='fsdp' needs a fresh optimizer (no state yet): wrap before the first "
                "update; load_checkpoint after wrapping restores the optimizer's state"
            )
    if not (dist.is_available() and dist.is_initialized()):
        return state
    if strategy == "fsdp":
        modules = {"policy": unwrap_model(state.policy)}
        if isinstance(state.value_model, nn.Module):
            modules["value_model"] = unwrap_model(state.value_model)
        old_names = {
            id(p): (key, name)
            for key, module in modules.items()
            for name, p in module.named_parameters()
        }
        modules = {key: _fsdp(module) for key, module in modules.items()}
        optimizer = state.optimizer
        if optimizer is not None:
            optimizer = _rebuilt_optimizer(optimizer, old_names, modules)
        if isinstance(state.ref_model, nn.Module) and state.ref_model is not modules["policy"]:
            broadcast_module(state.ref_model)
        return state._replace(
            policy=modules["policy"],
            value_model=modules.get("value_model", state.value_model),
            optimizer=optimizer,
        )
    info = get_distributed_info()
    policy = _ddp(state.policy, info, find_unused_parameters)
    value_model = state.value_model
    if isinstance(value_model, nn.Module):
        value_model = _ddp(value_model, info, find_unused_parameters)
    if isinstance(state.ref_model, nn.Module) and state.ref_model is not unwrap_model(
        state.policy
    ):
        broadcast_module(state.ref_model)
    return state._replace(policy=policy, value_model=value_model)


# --------------------------------------------------------------------------- collectives


def all_reduce_scalars(values: Sequence[float], op: str = "sum") -> list[float]:
    """Element-wise ``op`` (``"sum"``, ``"max"``, ``"min"``) of ``values`` over all ranks.

    One collective on a float64 tensor; every rank must pass the same number of values.
    Returns ``[float(v) for v in values]`` when not distributed.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    values = [float(v) for v in values]
    if not is_distributed() or not values:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
    return tensor.cpu().tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``dist.all_gather_object``).

    Returns ``[obj]`` when not distributed. Objects are pickled and sent whole, so use it for
    small metadata (RNG states, file names, counts), never for tensors (``gather_rows``).
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_rows(tensor: torch.Tensor, pad_value: float = 0) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``[B_r]`` or ``[B_r, T_r]`` tensor, concatenated along rows in rank order.

    ``T_r`` may differ between ranks: rows are right-padded with ``pad_value`` to ``max_r T_r``
    (as ``rollouts_to_batch`` pads a batch to its longest completion). ``B_r`` may be 0. Two
    collectives (the shapes, then the padded data).

    Args:
      tensor: a 1-D or 2-D tensor (same dtype and rank on every rank).
      pad_value: the column padding.
    Returns:
      ``(global [Σ B_r] or [Σ B_r, max T_r], [B_0, B_1, …])``; ``(tensor, [B])`` when not
      distributed.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"tensor must be a 1-D or 2-D torch.Tensor, got {shape}")
    if not is_distributed():
        return tensor, [int(tensor.shape[0])]
    device = _collective_device()
    world = dist.get_world_size()
    width = int(tensor.shape[1]) if tensor.dim() == 2 else 0
    shape = torch.tensor([tensor.shape[0], width], dtype=torch.long, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    max_rows, max_width = max(rows), max(int(s[1]) for s in shapes)
    size = (max_rows, max_width) if tensor.dim() == 2 else (max_rows,)
    padded = torch.full(size, pad_value, dtype=tensor.dtype, device=device)
    if tensor.dim() == 2:
        padded[: tensor.shape[0], :width] = tensor.to(device)
    else:
        padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    gathered = torch.cat([part[:count] for part, count in zip(parts, rows, strict=True)])
    return gathered.to(tensor.device), rows


def synchronize_gradients(
    parameters: Sequence[torch.Tensor], bucket_bytes: int = _GRADIENT_BUCKET_BYTES
) -> int:
    """Sums every parameter's ``.grad`` over all ranks, in place; returns the bytes all-reduced.

    ``g ← Σ_r g_r``: with micro-batch losses weighted by their share of the global normaliser
    (``microbatch_loss_weights(..., global_totals=...)``) this is the gradient of the global
    batch's loss. A parameter without a gradient on some rank counts as zero there; one without
    a gradient on every rank keeps ``grad=None`` (so the optimizer skips it, as in one process).
    Gradients are flattened into buckets of at most ``bucket_bytes`` (25 MiB, DDP's default)
    per dtype and device, one ``all_reduce`` each, after a first ``all_reduce`` of the
    "has a gradient" flags. Every rank must call it with the same parameter list.

    Args:
      parameters: the trainable parameters, in the same order on every rank.
      bucket_bytes: the largest bucket.
    Returns:
      the bytes passed to ``all_reduce`` (flags included); 0 when not distributed.
    """
    params = list(parameters)
    if not is_distributed() or not params:
        return 0
    device = _collective_device()
    flags = torch.tensor(
        [0.0 if p.grad is None else 1.0 for p in params], dtype=torch.float32, device=device
    )
    dist.all_reduce(flags)
    reduced = flags.numel() * flags.element_size()
    grads = []
    for param, flag in zip(params, flags.tolist(), strict=True):
        if flag == 0:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    for grad in grads:
        lists = buckets.setdefault((grad.dtype, grad.device), [[]])
        current = lists[-1]
        size = sum(g.numel() for g in current) * grad.element_size()
        if current and size + grad.numel() * grad.element_size() > bucket_bytes:
            lists.append([])
        lists[-1].append(grad)
    for lists in buckets.values():
        for bucket in lists:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            reduced += flat.numel() * flat.element_size()
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
    return reduced


# --------------------------------------------------------------------------- the loop's collectives


class DataParallel(NamedTuple):
    """The collectives the loop's phases use to act as one job over data-parallel ranks.

    Phases never test whether they run distributed: they call these functions, which in one
    process are identities (``create_single_process_parallel``) and under ``torchrun`` talk to
    the other ranks (``create_torch_data_parallel``); ``current_data_parallel`` picks. Pass your
    own to run the phases over another transport. Shapes: ``N = Σ_r B_r`` rows over all ranks.

    Fields:
      shard_prompts: ``fn(prompts) -> (this rank's prompts, index of its first prompt)``.
      rank_seed: ``fn(seed) -> this rank's sampling seed`` (``None`` stays ``None``).
      gather_rows: ``fn(tensor [B_r] or [B_r, T_r]) -> (tensor [N] or [N, max T_r], [B_0, …])``,
        the ranks' rows in rank order, columns right-padded with 0.
      local_rows: ``fn(row_counts) -> range`` of the global rows this rank holds.
      all_reduce: ``fn(values, op="sum") -> list[float]``, element-wise over ranks; ``op`` is
        ``"sum"``, ``"max"`` or ``"min"`` (so ``min`` of 0/1 flags agrees on "all finite").
      synchronize_gradients: ``fn(parameters) -> bytes sent``, sums ``.grad`` over ranks in
        place (0 bytes in one process).
      no_sync: ``fn(*models) -> context`` in which backward passes accumulate locally.
      gathered_parameters: ``fn(*models) -> context`` in which sharded models hold full weights,
        so ranks may run different numbers of forward passes.
      is_sharded: ``fn(model) -> bool``, True when its weights are sharded over ranks (FSDP2):
        then every rank runs as many forward/backward passes as the busiest one, and the
        backward passes already sum the gradients.
      full_model: ``fn(model, like) -> module`` holding ``model``'s full weights (unwrapped;
        under FSDP2 a copy of ``like`` loaded with the gathered weights), for reference updates.
      is_main_process: ``fn() -> bool``, True on the rank that logs.
    """

    shard_prompts: Any
    rank_seed: Any
    gather_rows: Any
    local_rows: Any
    all_reduce: Any
    synchronize_gradients: Any
    no_sync: Any
    gathered_parameters: Any
    is_sharded: Any
    full_model: Any
    is_main_process: Any


def _single_process_all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    return [float(v) for v in values]


def _full_model(model: Any, like: Any) -> Any:
    """``model`` unwrapped; under FSDP2 a copy of ``like`` holding ``model``'s gathered weights
    (collective)."""
    from copy import deepcopy

    module = unwrap_model(model)
    if not is_fsdp_module(module):
        return module
    copy = deepcopy(like)
    load_full_state_dict(copy, full_state_dict(module))
    return copy


def create_single_process_parallel() -> DataParallel:
    """The ``DataParallel`` of one process: every collective is an identity.

    ``shard_prompts(p) = (p, 0)``, ``rank_seed(s) = s``, ``gather_rows(x) = (x, [B])``,
    ``local_rows([B]) = range(B)``, ``all_reduce(v) = [float(x) for x in v]``, a gradient
    synchronisation that sends nothing (returns 0 bytes), no-op contexts, nothing sharded,
    ``full_model`` unwraps, and this process is the main one. With it the phases compute
    exactly what they compute without any collective.

    Returns:
      a ``DataParallel``.
    """
    return DataParallel(
        shard_prompts=lambda prompts: (prompts, 0),
        rank_seed=lambda seed: seed,
        gather_rows=lambda tensor: (tensor, [int(tensor.shape[0])]),
        local_rows=lambda row_counts: range(sum(row_counts)),
        all_reduce=_single_process_all_reduce,
        synchronize_gradients=lambda parameters: 0,
        no_sync=lambda *models: contextlib.nullcontext(),
        gathered_parameters=lambda *models: contextlib.nullcontext(),
        is_sharded=lambda model: False,
        full_model=_full_model,
        is_main_process=lambda: True,
    )


def create_torch_data_parallel() -> DataParallel:
    """The ``DataParallel`` of this rank of the ``torch.distributed`` process group.

    Rank ``r`` of ``N`` keeps ``shard_prompts``'s contiguous share of the prompts (its first
    index is the group offset), samples with ``rank_seed(seed, r)``, gathers rows with
    ``gather_rows`` (rank order = single-process order), holds the global rows
    ``[Σ_{q<r} B_q, Σ_{q≤r} B_q)``, reduces scalars with ``all_reduce_scalars``, sums gradients
    with ``synchronize_gradients``, defers DDP's reduction with ``no_sync``, gathers FSDP2
    weights with ``gathered_parameters``, treats FSDP2 modules as sharded (``is_fsdp_module``),
    and builds a full-weight policy for reference updates under FSDP2. Call it after
    ``init_distributed``; the module docstring says what each collective guarantees.

    Returns:
      a ``DataParallel`` bound to this process's rank and world size.
    """
    info = get_distributed_info()

    def shard(prompts: Sequence[Any]) -> tuple[list[Any], int]:
        start, stop = shard_bounds(len(prompts), info.rank, info.world_size)
        return list(prompts)[start:stop], start

    def local_rows(row_counts: Sequence[int]) -> range:
        start = sum(row_counts[: info.rank])
        return range(start, start + row_counts[info.rank])

    return DataParallel(
        shard_prompts=shard,
        rank_seed=lambda seed: rank_seed(seed, info.rank),
        gather_rows=gather_rows,
        local_rows=local_rows,
        all_reduce=all_reduce_scalars,
        synchronize_gradients=synchronize_gradients,
        no_sync=no_sync,
        gathered_parameters=gathered_parameters,
        is_sharded=is_fsdp_module,
        full_model=_full_model,
        is_main_process=is_main_process,
    )


def current_data_parallel() -> DataParallel:
    """The loop's default ``DataParallel``: ``create_torch_data_parallel()`` when a process
    group of more than one rank exists (``torchrun``), else ``create_single_process_parallel()``.

    The phases and ``train`` call it when their ``data_parallel`` argument is ``None``, so the
    same script runs in one process and under ``torchrun``.

    Returns:
      a ``DataParallel``.
    """
    return create_torch_data_parallel() if is_distributed() else create_single_process_parallel()
