"""Built-in methods; importing a module registers its config class (see :mod:`mmcompress.registry`)."""

from . import (
    divprune,  # noqa: F401
    pool,  # noqa: F401
    random,  # noqa: F401
)
