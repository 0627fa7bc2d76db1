"""``python -m ai_query.testing``: the provider simulator (same options as ``ai-query simulate``)."""

import sys

from ._cli import simulator_main

sys.exit(simulator_main(sys.argv[1:], prog="python -m ai_query.testing"))
