import sys

from melanoma.cli.main import main

sys.exit(main())
