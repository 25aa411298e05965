"""The data ablation behind ``curate ablate``: config (arms, seeds, schedule, evaluations), the arms'
data, one training run per arm and seed, and the table of results."""
