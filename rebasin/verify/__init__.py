"""Verified writes: pi(B) must compute what B computes (``equivalence``), checked by a worker
prepared while the command matches (``worker``)."""
