"""Entry point for launchers: `deepspeed [--num_gpus N | --hostfile F] launch/pretrain.py --config ...`
and `torchrun --nproc_per_node N launch/pretrain.py --config ...`.

Identical to `sparse-lm pretrain`; launchers need a script path, and the `deepspeed` launcher adds
`--local_rank`, which the shared argument parser accepts.
"""

import sys

from sparse_lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
