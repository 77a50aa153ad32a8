import sys

from stripinspect.cli import main

sys.exit(main())
