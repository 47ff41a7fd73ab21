"""The one entry point of scaled/: train any run config under any launcher.

    python scaled/train.py scaled/configs/runs/m6_base_pretrain.yaml                     # one process
    torchrun --nproc_per_node 8 scaled/train.py RUN.yaml                                   # DDP
    accelerate launch --config_file scaled/launch/accelerate/fsdp.yaml scaled/train.py RUN.yaml   # FSDP / DeepSpeed
    python scaled/train.py RUN.yaml train.steps=10 out_dir=/tmp/run                        # key=value overrides
    python scaled/train.py RUN.yaml --dry-run                                              # what it would do

Same as `mmkit train RUN.yaml ...` (mmkit/cli.py); the launcher, not the run config, picks the strategy.
"""
import sys

from mmkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
