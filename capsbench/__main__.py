import sys

from capsbench.cli.main import main

sys.exit(main())
