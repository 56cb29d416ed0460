"""``python -m mmcompress.evals``: the evaluation runner (``mmcompress eval`` with the same arguments).

Data parallel over N processes (CUDA: one GPU each; CPU: gloo)::

    accelerate launch --multi_gpu --num_processes N -m mmcompress.evals --model M --task T --out DIR
"""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
