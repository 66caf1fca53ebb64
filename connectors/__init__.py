"""Sources, sinks and model clients."""
