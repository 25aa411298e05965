"""The stages that bind catalog I/O to the algorithms, the stage runner, the `curate` CLI and the demo."""

from catalog.ray_runtime import set_ray_environment

set_ray_environment()  # Ray reads some of these at import, and stage modules may import it
