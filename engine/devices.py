"""The accelerator: batches onto it, its fast-math defaults, its memory high-water mark."""
from __future__ import annotations

import torch


def to_device(batch: dict, device) -> dict:
    """Tensors of ``batch`` onto ``device``; non-blocking, so a pinned batch (the loader pins on
    CUDA) is copied while the GPU still works on the previous step."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def use_fast_cuda_defaults() -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (the bf16 path is unaffected) and cuDNN
    autotuning: the input shapes are fixed for a whole run, so the tuned kernels are reused."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # torch >= 2.9 refuses a mix of this API and the allow_tf32 flags: use one of them only
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def peak_memory_mb(device) -> float | None:
    """The most CUDA memory this process's tensors held so far, in MiB; None off CUDA."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
