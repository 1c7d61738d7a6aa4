"""``python -m prac`` is the same as the ``prac`` command."""

from prac.cli import main

raise SystemExit(main())
