"""``python -m lcjax.train --config configs/mqar.py[:ARG] --workdir DIR [--config.key=value ...]``.

The same as ``lcjax train`` (both are ``lcjax/train/command.py``); ``make train`` runs it on ``configs/default.py``.
"""

import sys

from lcjax.train import command

if __name__ == "__main__":
    sys.exit(command.main(["python -m lcjax.train", *sys.argv[1:]]))
