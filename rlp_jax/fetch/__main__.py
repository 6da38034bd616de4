import sys

from rlp_jax.fetch import main

sys.exit(main())
