"""Prompts of the shipped text-to-image model: class names, templates, and the fixed prompt sets.

The model draws MNIST digits from prompts written from the ten class names with several templates;
the empty prompt is the unconditional half of classifier-free guidance (CFG). The calibration and
evaluation sets are fixed lists, so every run of `qexport convert` / `qexport eval` sees the same text.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "{name}",
    "the digit {name}",
    "a handwritten {name}",
    "a photo of the number {name}",
    "the number {digit}",
    "a drawing of a {name}",
    "digit {digit}",
    "an image of the digit {name}, handwritten",
)
# Held out of training: the evaluation prompts use a template the model never saw, one per class.
EVAL_TEMPLATE = "a picture of the digit {name}"
EMPTY_PROMPT = ""


def prompt(label: int, template: str) -> str:
    return template.format(name=CLASS_NAMES[label], digit=label)


def training_prompts(labels: np.ndarray, rng: np.random.Generator, drop: float) -> list[str]:
    """One prompt per label, template drawn at random; the empty prompt with probability `drop`."""
    out = []
    for y in labels:
        if rng.random() < drop:
            out.append(EMPTY_PROMPT)
        else:
            out.append(prompt(int(y), TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]))
    return out


def eval_prompts() -> list[str]:
    """The ten evaluation prompts (class i at index i)."""
    return [prompt(c, EVAL_TEMPLATE) for c in range(len(CLASS_NAMES))]


def calibration_prompts() -> list[str]:
    """Calibration text: every class under two training templates (the empty prompt is added by CFG)."""
    return [prompt(c, t) for t in (TRAIN_TEMPLATES[1], TRAIN_TEMPLATES[3]) for c in range(len(CLASS_NAMES))]


def corpus() -> list[str]:
    """Every prompt the tokenizer must encode compactly (training and evaluation templates)."""
    return [prompt(c, t) for t in (*TRAIN_TEMPLATES, EVAL_TEMPLATE) for c in range(len(CLASS_NAMES))]
