"""What a prediction passes through: the networks and their weights, the one images-to-probabilities path, and the
out-of-distribution gate."""
