"""``python -m icrewrite.cli``: the same as the ``icrewrite`` command."""
from . import main

raise SystemExit(main())
