import sys

from rlp_jax.evaluate.cli import main

sys.exit(main())
