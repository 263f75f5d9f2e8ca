"""`python -m epruntime.compat [--markdown]`: the declared CPU adapters of megatron-core."""

import sys

from epruntime.compat.adapters import render_table

sys.stdout.write(render_table(markdown="--markdown" in sys.argv[1:]))
