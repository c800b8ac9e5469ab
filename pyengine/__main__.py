"""``python -m pyengine`` and ``torchrun --nproc-per-node N -m pyengine ...``: the ``pyengine`` command."""

from pyengine.cli import main

raise SystemExit(main())
