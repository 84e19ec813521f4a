"""Parameter-server training with optserve; run ``python -m examples.parameter_server``."""
