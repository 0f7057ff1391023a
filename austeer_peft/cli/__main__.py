"""`python -m austeer_peft.cli`: the `austeer` command."""

import sys

from . import main

sys.exit(main())
