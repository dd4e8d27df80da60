"""Built-in tasks: prompts, tools, environments and rewards for common RL post-training setups.

Each task lives in its own module and defines its ``__all__``; this package re-exports them
flat (``from rlprim.tasks import svrl_reward``): ``arithmetic`` (the bundled model's task),
``countdown``, ``math_word`` (``#### answer`` problems), ``code`` (unit-tested functions in the
sandboxed Python tool), ``svrl`` (self-verification with a tool budget), ``conversation`` and
``constitutional`` (harmlessness principles with AI feedback).
"""

from rlprim.tasks import arithmetic as _arithmetic
from rlprim.tasks import code as _code
from rlprim.tasks import constitutional as _constitutional
from rlprim.tasks import conversation as _conversation
from rlprim.tasks import countdown as _countdown
from rlprim.tasks import math_word as _math_word
from rlprim.tasks import svrl as _svrl
from rlprim.tasks.arithmetic import *  # noqa: F401,F403
from rlprim.tasks.code import *  # noqa: F401,F403
from rlprim.tasks.constitutional import *  # noqa: F401,F403
from rlprim.tasks.conversation import *  # noqa: F401,F403
from rlprim.tasks.countdown import *  # noqa: F401,F403
from rlprim.tasks.math_word import *  # noqa: F401,F403
from rlprim.tasks.svrl import *  # noqa: F401,F403

__all__ = [
    *_arithmetic.__all__,
    *_countdown.__all__,
    *_math_word.__all__,
    *_code.__all__,
    *_svrl.__all__,
    *_conversation.__all__,
    *_constitutional.__all__,
]
