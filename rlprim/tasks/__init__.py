"""Built-in tasks: prompts, tools, environments and rewards for common RL post-training setups.

Each task lives in its own module and defines its ``__all__``; this package re-exports them
flat (``from rlprim.tasks import svrl_reward``).
"""

from rlprim.tasks import conversation as _conversation
from rlprim.tasks import svrl as _svrl
from rlprim.tasks.conversation import *  # noqa: F401,F403
from rlprim.tasks.svrl import *  # noqa: F401,F403

__all__ = [*_svrl.__all__, *_conversation.__all__]
