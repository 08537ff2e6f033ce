"""``python -m lkvision.train [args]`` (what torchrun runs): same as ``lkvision train``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
