"""Sample quality of the default digits-2 model (acceptance 3): a cheap classifier signal."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.slow
def test_default_model_draws_recognisable_digits():
    """A logistic regression fitted on all ten sklearn digit classes labels ≥ 80 % of 64 samples
    as 0 or 1 (the trained classes) with probability > 0.8."""
    from attribution_diffusion import DDPMDigitsTask
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    task = DDPMDigitsTask()  # defaults: digits-2, T = 1000
    model = task.base_model(0)
    x, _ = task.sample(model, 64, seed=0)
    images = task.images({"x": x}).reshape(64, 64).numpy()
    digits = load_digits()
    clf = LogisticRegression(max_iter=5000, C=10.0).fit(digits.data / 16.0, digits.target)
    assert clf.score(digits.data / 16.0, digits.target) > 0.95  # the judge itself works
    proba = clf.predict_proba(images)
    good = np.isin(proba.argmax(1), [0, 1]) & (proba.max(1) > 0.8)
    counts = np.bincount(proba.argmax(1), minlength=10).tolist()
    print(f"confident 0/1 samples: {good.mean():.1%}; predicted classes {counts}")
    assert good.mean() >= 0.8, f"only {good.mean():.0%} confident 0/1 samples"
    # noise images are not labelled so: the signal is not trivially satisfied
    noise = np.random.default_rng(0).uniform(0, 1, (64, 64))
    pn = clf.predict_proba(noise)
    assert (np.isin(pn.argmax(1), [0, 1]) & (pn.max(1) > 0.8)).mean() < 0.5
