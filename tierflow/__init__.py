"""tierflow: route records to a cheap model first, escalate the uncertain ones, account for every cent."""
__version__ = "0.1.0"
