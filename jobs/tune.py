"""Ray Tune sweep of the phase-2 learning rate (see cifar_ray/tune.py).

    python jobs/tune.py --smoke                                   # CPU, synthetic, minutes
    python jobs/tune.py --data s3://bucket/datasets --storage s3://bucket/sweeps \
        --name lr-sweep --lrs 3e-5 1e-4 3e-4 1e-3 --workers 2 --use-gpu
    python jobs/tune.py ... --name lr-sweep --resume              # after the driver died
    ray job submit --working-dir . -- python jobs/tune.py --data s3://bucket/datasets \
        --storage s3://bucket/sweeps --name lr-sweep --workers 2 --use-gpu

--workers is per trial; trials run concurrently as far as the cluster's CPUs/GPUs allow.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, without an install

from cifar_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
