"""``python -m nnxfit``: the same command line as the ``nnxfit`` script (see ``nnxfit.cli``)."""

from nnxfit.cli import main

raise SystemExit(main())
