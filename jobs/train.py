"""Two-phase ResNet50 transfer learning on Ray Train (see cifar_ray/train.py).

    python jobs/train.py --smoke                       # CPU, synthetic data
    python jobs/train.py --data s3://bucket/datasets --storage s3://bucket/runs \
        --name r50-a --workers 4 --use-gpu
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/datasets \
        --storage s3://bucket/runs --name r50-a --workers 4 --use-gpu

Run directly, it joins the cluster in RAY_ADDRESS (or a local `ray start`), else starts a
local Ray instance for the duration of the job.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, without an install

from cifar_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
