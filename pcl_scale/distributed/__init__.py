"""Distribution glue: the communicator, sharded extraction by dataset index, the E-step.

Imports ``pcl_scale.core`` only; ``comm`` is the one module that calls ``torch.distributed``.
"""
