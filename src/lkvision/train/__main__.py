"""``python -m lkvision.train [args]`` (what torchrun runs): same as ``lkvision train``."""

import sys

from .cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
