"""``python -m flash_depth.train [args]`` (also under torchrun): the same as ``flash-depth train``."""

import sys

from flash_depth.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
