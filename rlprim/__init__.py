"""rlprim: pure functions and NamedTuples for RL post-training of language models.

Import it flat: ``import rlprim as rp``; every public name lives at the top level and in
``rlprim.__all__``. Modules are split by topic (``rlprim.advantages``, ``rlprim.kl``, …).
"""

from rlprim import advantages as _advantages
from rlprim import algorithms as _algorithms
from rlprim import batching as _batching
from rlprim import checkpoint as _checkpoint
from rlprim import constitutional as _constitutional
from rlprim import critic as _critic
from rlprim import data as _data
from rlprim import distributed as _distributed
from rlprim import inference as _inference
from rlprim import kl as _kl
from rlprim import logging as _logging
from rlprim import logprobs as _logprobs
from rlprim import losses as _losses
from rlprim import protocols as _protocols
from rlprim import quick_start as _quick_start
from rlprim import remote as _remote
from rlprim import reward_models as _reward_models
from rlprim import rewards as _rewards
from rlprim import rollouts as _rollouts
from rlprim import serialization as _serialization
from rlprim import tools as _tools
from rlprim import training as _training
from rlprim import types as _types
from rlprim import vllm_engine as _vllm_engine
from rlprim.advantages import *  # noqa: F401,F403
from rlprim.algorithms import *  # noqa: F401,F403
from rlprim.batching import *  # noqa: F401,F403
from rlprim.checkpoint import *  # noqa: F401,F403
from rlprim.constitutional import *  # noqa: F401,F403
from rlprim.critic import *  # noqa: F401,F403
from rlprim.data import *  # noqa: F401,F403
from rlprim.distributed import *  # noqa: F401,F403
from rlprim.inference import *  # noqa: F401,F403
from rlprim.kl import *  # noqa: F401,F403
from rlprim.logging import *  # noqa: F401,F403
from rlprim.logprobs import *  # noqa: F401,F403
from rlprim.losses import *  # noqa: F401,F403
from rlprim.protocols import *  # noqa: F401,F403
from rlprim.quick_start import *  # noqa: F401,F403
from rlprim.remote import *  # noqa: F401,F403
from rlprim.reward_models import *  # noqa: F401,F403
from rlprim.rewards import *  # noqa: F401,F403
from rlprim.rollouts import *  # noqa: F401,F403
from rlprim.serialization import *  # noqa: F401,F403
from rlprim.tools import *  # noqa: F401,F403
from rlprim.training import *  # noqa: F401,F403
from rlprim.types import *  # noqa: F401,F403
from rlprim.vllm_engine import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = [
    *_types.__all__,
    *_protocols.__all__,
    *_advantages.__all__,
    *_kl.__all__,
    *_losses.__all__,
    *_rewards.__all__,
    *_reward_models.__all__,
    *_algorithms.__all__,
    *_inference.__all__,
    *_logprobs.__all__,
    *_tools.__all__,
    *_rollouts.__all__,
    *_batching.__all__,
    *_constitutional.__all__,
    *_checkpoint.__all__,
    *_training.__all__,
    *_quick_start.__all__,
    *_critic.__all__,
    *_data.__all__,
    *_logging.__all__,
    *_serialization.__all__,
    *_distributed.__all__,
    *_vllm_engine.__all__,
    *_remote.__all__,
]
