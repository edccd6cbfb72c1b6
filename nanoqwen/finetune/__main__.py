"""python -m nanoqwen.finetune ... (torchrun --nproc-per-node N -m nanoqwen.finetune ...)"""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
