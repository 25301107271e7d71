import sys

from fuser.source_tree import leave_clone_root

leave_clone_root()

from fuser.cli import main  # noqa: E402

sys.exit(main())
