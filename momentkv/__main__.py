import sys

from momentkv.cli.main import main

sys.exit(main())
