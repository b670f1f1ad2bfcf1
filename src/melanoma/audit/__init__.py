"""② What is wrong with the data: the audit (copies, near-copies, label conflicts, Train/Test leaks, truth
disagreements), the clean manifest and the selections it makes, and the audit report."""
