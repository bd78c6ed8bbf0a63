"""The algorithm: ProtoNCE/InfoNCE, negative prototypes, k-means, phi, the model, schedules.

Pure math on tensors: imports torch, numpy and timm only, never ``torch.distributed``, Accelerate
or another pcl_scale subpackage. A reduction over ranks is an injected callable.
"""
