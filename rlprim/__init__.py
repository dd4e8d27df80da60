"""rlprim: pure functions and NamedTuples for RL post-training of language models.

Import it flat: ``import rlprim as rp``; every public name lives at the top level and in
``rlprim.__all__``. Modules are split by topic (``rlprim.advantages``, ``rlprim.kl``, …).
"""

from rlprim import advantages as _advantages
from rlprim import algorithms as _algorithms
from rlprim import kl as _kl
from rlprim import losses as _losses
from rlprim import protocols as _protocols
from rlprim import rewards as _rewards
from rlprim import tools as _tools
from rlprim import types as _types
from rlprim.advantages import *  # noqa: F401,F403
from rlprim.algorithms import *  # noqa: F401,F403
from rlprim.kl import *  # noqa: F401,F403
from rlprim.losses import *  # noqa: F401,F403
from rlprim.protocols import *  # noqa: F401,F403
from rlprim.rewards import *  # noqa: F401,F403
from rlprim.tools import *  # noqa: F401,F403
from rlprim.types import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = [
    *_types.__all__,
    *_protocols.__all__,
    *_advantages.__all__,
    *_kl.__all__,
    *_losses.__all__,
    *_rewards.__all__,
    *_algorithms.__all__,
    *_tools.__all__,
]
