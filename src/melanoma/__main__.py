import sys

from melanoma.cli import main

sys.exit(main())
