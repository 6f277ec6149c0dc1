"""KFP v2 components, one per stage: typed inputs and outputs, then a call into ferpipe."""
