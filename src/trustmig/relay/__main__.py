"""``python -m trustmig.relay``: one migration's data path (see :mod:`trustmig.relay.process`)."""

import sys

from trustmig.relay.process import main

sys.exit(main())
