"""``python -m fc_pipeline.cli``: the ``fc-pipeline`` command."""

import sys

from fc_pipeline.cli.main import main

sys.exit(main())
