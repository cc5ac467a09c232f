"""The miniature world: two synthetic languages, tasks, and a small base model with
specialists fine-tuned from it, all trained on CPU and deterministic for a seed.

    from shoal.zoo import build_zoo
    world = build_zoo("small")          # cached after the first build
    world.model("math")                 # a Hugging Face folder
    world.task("math_b")                # the cross task
"""

from shoal.zoo.build import (WORLD_VERSION, ZooError, ZooWorld, build_zoo, default_root, load_zoo,
                              resolve_zoo_ref)
from shoal.zoo.tasks import ZOO_TASKS, ZooTask, get_zoo_task

__all__ = ["WORLD_VERSION", "ZOO_TASKS", "ZooError", "ZooTask", "ZooWorld", "build_zoo", "resolve_zoo_ref",
           "default_root", "get_zoo_task", "load_zoo"]
