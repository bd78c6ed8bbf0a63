"""Check the momentum update against full parameters under any launcher (DDP or ZeRO-1/2/3).

    accelerate launch --config_file accelerate_configs/cpu_2proc_zero3.yaml \
        tests/scripts/ema_check.py OUT.json

Rank 0 writes the largest deviation of m = 0.99 from the reference computed on the consolidated
(full) parameters, the largest |k - q| after m = 0, and how many parameters were partitioned.
"""

import json
import sys

import torch

from pcl_scale.config import load_config
from pcl_scale.core.model import BackboneSpec, PCLModel
from pcl_scale.engine.runtime import (
    make_accelerator,
    model_state,
    set_deepspeed_batch,
    shutdown,
    zero_stage,
)


def params_only(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return {
        k[len(prefix) :]: v.float()
        for k, v in state.items()
        if k.startswith(prefix) and not k.endswith(skip)
    }


def snapshot(accelerator, model) -> dict[str, torch.Tensor]:
    """Copies of the full state (a plain state dict aliases the live weights)."""
    state = model_state(accelerator, model) or {}  # ZeRO-3: consolidated on rank 0 only
    return {k: v.detach().clone() for k, v in state.items()}


def main() -> None:
    out = sys.argv[1]
    cfg = load_config(None, ["optim.batch_size=8"])
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = PCLModel(BackboneSpec("resnet18", True, 8, 4), 16, "mlp", 32)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    set_deepspeed_batch(accelerator, 4)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(accelerator.process_index))
    q, _ = model(x)  # one step, so the online encoder moves away from the momentum encoder
    accelerator.backward(q[:, 0].sum())
    optimizer.step()
    optimizer.zero_grad()
    inner.embed(x)  # a forward outside the engine, as the E-step and the keys do

    before = snapshot(accelerator, model)
    inner.momentum_update(0.99)
    after = snapshot(accelerator, model)
    inner.momentum_update(0.0)
    zeroed = snapshot(accelerator, model)
    partitioned = sum(
        1 for p in inner.parameters() if hasattr(p, "ds_tensor") and p.data.numel() == 0
    )
    if accelerator.is_main_process:
        q0, k0 = params_only(before, "encoder_q."), params_only(before, "encoder_k.")
        k1 = params_only(after, "encoder_k.")
        q2, k2 = params_only(zeroed, "encoder_q."), params_only(zeroed, "encoder_k.")
        ref = {n: 0.99 * k0[n] + 0.01 * q0[n] for n in k0}
        result = {
            "stage": zero_stage(accelerator),
            "num_params": len(k0),
            "moved": max(float((q0[n] - k0[n]).abs().max()) for n in k0),
            "err_m099": max(float((ref[n] - k1[n]).abs().max()) for n in k0),
            "err_m0": max(float((q2[n] - k2[n]).abs().max()) for n in k0),
            "partitioned": partitioned,
        }
        with open(out, "w") as fh:
            json.dump(result, fh)
    del model, optimizer, inner
    shutdown(accelerator)


if __name__ == "__main__":
    main()
