"""Perplexity is exp(mean NLL) over all predicted tokens."""

import math

import torch

from prac.parallel.evaluate import mean_cosine, perplexity
from tests.conftest import make_tiny_model


def test_perplexity_equals_exp_of_the_models_own_loss():
    model = make_tiny_model("mistral")
    windows = torch.randint(0, 4096, (3, 17), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    # every window predicts the same number of tokens, so the mean NLL is the mean of window losses
    assert math.isclose(result["ppl"], math.exp(sum(losses) / 3), rel_tol=1e-5)
    assert result["predicted_tokens"] == 3 * 16


def test_mean_cosine():
    a = torch.randn(2, 5, 8)
    assert math.isclose(mean_cosine(a, a), 1.0, rel_tol=1e-12)
    assert math.isclose(mean_cosine(a, -a), -1.0, rel_tol=1e-12)
