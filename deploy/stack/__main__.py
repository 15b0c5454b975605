import sys

from deploy.stack.stack import main

sys.exit(main())
