"""The recipe stage: a mergekit YAML recipe, what mergekit will merge from it, and the guarded run."""
