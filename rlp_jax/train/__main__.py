import sys

from rlp_jax.train.loop import main

sys.exit(main())
