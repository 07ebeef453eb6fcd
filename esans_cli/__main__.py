import sys

from esans_cli.main import main

sys.exit(main())
