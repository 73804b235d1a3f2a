import os
import sys

# Triton reads this at import: without a GPU, its interpreter runs the kernels on CPU tensors.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

sys.path.insert(0, os.path.dirname(__file__))
