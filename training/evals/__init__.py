"""Evaluations of a frozen backbone: k-NN (overall, head and tail concepts), a linear probe, instance
retrieval and the dense probe, each a function of the backbone and an evaluation set, and
``EvalSuite``, which loads the configured sets once and scores any number of backbones with them.
"""
