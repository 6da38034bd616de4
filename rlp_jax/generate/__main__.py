import sys

from rlp_jax.generate.cli import main

sys.exit(main())
