"""``python -m umtam_jax.merge``: the ``umtam-merge`` command (see :mod:`umtam_jax.cli.merge`)."""

import sys

from umtam_jax.cli.merge import main

if __name__ == "__main__":
    sys.exit(main())
