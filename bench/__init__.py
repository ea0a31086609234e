"""`python -m bench`: every kernel against every peer, on the same inputs, in one process."""
