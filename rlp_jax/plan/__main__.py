import sys

from rlp_jax.plan.cli import main

sys.exit(main())
