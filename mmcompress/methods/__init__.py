"""Built-in methods; importing a module registers its config class (see :mod:`mmcompress.registry`)."""

from ..kv import method as mixed_kv  # noqa: F401  (registers "mixed_kv")
from . import (
    aim_merge,  # noqa: F401
    aim_prune,  # noqa: F401
    divprune,  # noqa: F401
    fopru,  # noqa: F401
    globalcom2,  # noqa: F401
    hired,  # noqa: F401
    pool,  # noqa: F401
    random,  # noqa: F401
    zipvl,  # noqa: F401
)
