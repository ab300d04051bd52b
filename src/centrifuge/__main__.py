import sys

from centrifuge.cli.main import main

sys.exit(main())
