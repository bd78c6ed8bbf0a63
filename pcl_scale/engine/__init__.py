"""The training engine on Accelerate/DeepSpeed: the loop, M-step, checkpoints and export.

The top of the stack: only ``pcl_scale.cli`` imports it.
"""
