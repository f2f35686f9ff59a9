"""Write CIFAR-10 as Parquet shards under <data>/<dataset>/ (see cifar_ray/data.py).

    python jobs/prepare_data.py --source folder \
        --source-uri ../shared/data/cifar10-train-jpeg.tar.gz --data ./data
    python jobs/prepare_data.py --source torchvision --data s3://bucket/datasets
    ray job submit --working-dir . -- python jobs/prepare_data.py --source archive \
        --source-uri s3://bucket/raw/cifar-10-python.tar.gz --data s3://bucket/datasets

Re-running with the same arguments finds the manifest and does nothing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, without an install

from cifar_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare-data", *sys.argv[1:]]))
