import sys

from unimodal.cli.main import main

sys.exit(main())
