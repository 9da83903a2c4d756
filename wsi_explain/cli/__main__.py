"""``python -m wsi_explain.cli``: the same as the ``wsi-explain`` command."""

from wsi_explain.cli import main

main()
