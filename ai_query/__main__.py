"""``python -m ai_query ...`` is ``ai-query ...``."""

import sys

from ._commands import main

sys.exit(main())
