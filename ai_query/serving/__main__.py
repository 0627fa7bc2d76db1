import sys

from ._server import serve_main

sys.exit(serve_main())
