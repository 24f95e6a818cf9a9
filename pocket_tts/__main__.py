"""`python -m pocket_tts`: the `pocket-tts` command line."""

import sys

from pocket_tts.cli import main

sys.exit(main())
