"""The ``capsbench`` command: ``main`` builds the parser from one module per sub-command."""
