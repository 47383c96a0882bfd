"""The one entry script: srun tasks (slurm/train.sbatch.in), torchrun, the deepspeed launcher.

    srun python launchers/train.py CONFIG.yaml [section.key=value ...]      (as `mlra-mega submit` does)
    torchrun --nproc-per-node 8 launchers/train.py CONFIG.yaml ...
    deepspeed --num_gpus 8 launchers/train.py CONFIG.yaml ...

The launcher's `--local_rank=N` argument is accepted and ignored (LOCAL_RANK is in the
environment too). Same as `mlra-mega train CONFIG.yaml ...`.
"""

import sys

from mlra_mega.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
