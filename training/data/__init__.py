"""Training data: the mixed batch sampler, multi-crop augmentation, iBOT masks and the resumable loader."""
