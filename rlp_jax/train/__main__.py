import sys

from rlp_jax.train.cli import main

sys.exit(main())
