"""``python -m examples.parameter_server``: see :mod:`examples.parameter_server.train`."""

from examples.parameter_server.train import main

main()
