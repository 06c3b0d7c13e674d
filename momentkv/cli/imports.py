"""``--import MODULE`` for the commands that load policies: import modules that register custom scorers.

The option is declared here; the import itself is :func:`momentkv.user_modules.import_modules`, which lm-eval's
``import=`` model argument uses too.
"""

from __future__ import annotations


def add_import_option(parser) -> None:
    """Add ``--import MODULE`` (repeatable) to a subcommand's parser."""
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import MODULE (a dotted module name or a .py file) first, so that the scorers it registers can be "
        "named in policies (repeatable)",
    )
