"""The pre-merge audit: trigger inversion on each expert, an anomaly index, one verdict each."""
