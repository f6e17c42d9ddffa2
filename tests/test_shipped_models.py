"""The shipped models are trained: the classifier recognises the DDPM's samples."""

import json

import pytest

pytest.importorskip("torch", reason="needs the toolchain extra")

from qexport.zoo.registry import MAIN_MODEL, SHIPPED  # noqa: E402

from .conftest import shipped_or_skip  # noqa: E402


def test_classifier_recognises_ddpm_samples():
    """Would fail for an untrained model: DDIM-50, seed 0, 128 samples; ≥ 70% must get max prob > 0.9."""
    from qexport.zoo.loading import load_model
    from qexport.zoo.model_card import classifier_verdict, sample_torch

    shipped_or_skip(MAIN_MODEL)
    shipped_or_skip("digits16-classifier")
    model = load_model(MAIN_MODEL)
    v = classifier_verdict(sample_torch(model.unet, model.scheduler_config, n=128, steps=50, seed=0))
    assert v["confident_share"] >= 0.70, v
    assert min(v["class_histogram"]) >= 3, f"mode collapse: {v['class_histogram']}"


def test_noise_is_not_recognised():
    """The same check on pure noise fails, so the test above measures something."""
    import numpy as np

    from qexport.zoo.model_card import classifier_verdict

    shipped_or_skip("digits16-classifier")
    v = classifier_verdict(np.random.default_rng(0).uniform(-1, 1, (128, 1, 16, 16)).astype(np.float32))
    assert v["confident_share"] < 0.70


def test_model_cards_and_training_records():
    for m in SHIPPED:
        shipped_or_skip(m.name)
        card = (m.path / "MODEL_CARD.md").read_text()
        rec = json.loads((m.path / "training.json").read_text())
        assert rec["params"] == m.params() and f"{rec['params']:,}" in card
        assert m.bytes() < 8_000_000, "keep shipped files a few MB"
        if m.role != "classifier":
            assert (m.path / "samples.png").exists() and rec["steps"] >= 2000
        else:
            assert rec["heldout_accuracy"] > 0.95
