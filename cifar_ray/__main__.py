"""`python -m cifar_ray`: the `cifar-ray` console script, where that is not on PATH (a venv
not activated, a checkout run with PYTHONPATH=. instead of installed).

    python -m cifar_ray train --smoke
    python -m cifar_ray --help            # the subcommands; `... train --help` for the flags
"""

import sys

from cifar_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
