"""``python -m lcjax.train --config configs/mqar.py[:ARG] --workdir DIR [--config.key=value ...]``.

The same as ``lcjax train`` (see ``lcjax/cli.py``); ``make train`` runs it on ``configs/default.py``.
"""

import sys

from lcjax.cli import train_main

if __name__ == "__main__":
    if any(a in ("-h", "--help", "-help") for a in sys.argv[1:]):
        from lcjax.cli import main

        sys.exit(main(["train", "--help"]))
    sys.exit(train_main(sys.argv))
