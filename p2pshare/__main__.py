import sys

from p2pshare.cli import main

sys.exit(main())
