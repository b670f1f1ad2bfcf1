"""Helpers every stage uses and that know nothing of the others: the errors a user reads, text for one-line
messages, atomic file writing, what the machine can do, the figures."""
