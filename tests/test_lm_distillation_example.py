"""python/lm_distillation.py runs at its --tiny size and does what it claims."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("example_lm_distillation", ROOT / "python" / "lm_distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_distillation_tiny():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    # One thread: the models are tiny, and a second one only waits on a busy machine.
    result = load_example().main(["--tiny", "--threads", "1"])
    ppl = result["perplexity"]
    assert set(ppl) == {"teacher", "untrained_student", "ce", "classic_kd", "moe_kd"}
    assert all(math.isfinite(v) for v in ppl.values())
    # An untrained model is about uniform over the vocabulary; every trained one learned from the text.
    assert ppl["untrained_student"] > 0.8 * result["vocab_size"]
    for name in ("teacher", "ce", "classic_kd", "moe_kd"):
        assert ppl[name] < 0.7 * ppl["untrained_student"], (name, ppl)
    memory = result["memory"]
    if memory["materialised"] is not None:   # Linux: the fused step holds a fraction of the logits
        assert memory["fused_linear"] < 0.5 * memory["materialised"], memory
