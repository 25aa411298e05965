"""The SSL trainer: DINOv3-style student/EMA-teacher pretraining with FSDP2, exact resume and export.

Entry points: ``python -m training.train --config FILE key=value ...`` (also under ``torchrun``),
``training.train.loop.train(config)`` and ``training.train.ray_launch.launch_on_ray``.
"""
