"""The SSL trainer: DINOv3-style student/EMA-teacher pretraining with FSDP2, exact resume and export.

Entry points: ``python -m training.train --config FILE key=value ...`` (also under ``torchrun``),
``training.train.loop.train(config)`` (this process) and ``training.train.launch.run_training`` (here or on Ray).
"""
