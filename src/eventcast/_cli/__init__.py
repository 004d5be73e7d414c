"""The hub-facing commands of the ``eventcast`` command line (internal).

:mod:`eventcast.cli` registers them with :func:`eventcast._cli.commands.register`.
"""
