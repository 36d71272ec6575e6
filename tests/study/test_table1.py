"""study/table1.py: each loss's pull at the prior (§3.3) against the paper's formulas, by hand."""
import math

import pytest

from study.table1 import pull_at_prior


def test_pull_at_prior_is_n_pi_over_one_minus_pi_for_ce_and_falls_with_gamma():
    assert pull_at_prior(0, None, 22327) == pytest.approx(22327 * 0.01 / 0.99)  # CE: |dz| = p and 1 - p
    assert pull_at_prior(0, 0.75, 1000) == pytest.approx(1000 * 0.01 / 0.99 * 0.25 / 0.75)  # α_t weights
    pulls = [pull_at_prior(g, 0.25, 22327) for g in (0.5, 1, 2, 5)]
    assert pulls == sorted(pulls, reverse=True) and pulls[1] > 1 > pulls[2]  # γ = 1 pulls down, γ = 2 up


def test_pull_at_prior_of_fl_gamma_2_by_hand():
    # dFL/dz = α_t (1 - p_t)^γ (γ p_t log p_t - (1 - p_t)), z the true class's logit; at the prior a positive has
    # p_t = .01 and a negative p_t = .99 (§3.3): |0.25 x 0.99^2 x (0.02 ln .01 - 0.99)| = 0.265142 for the positive,
    # |0.75 x 0.01^2 x (1.98 ln .99 - 0.01)| = 2.24247e-6 for each negative, 22,327 of them (the dense set's count)
    positive = 0.25 * 0.99**2 * abs(2 * 0.01 * math.log(0.01) - 0.99)
    negative = 0.75 * 0.01**2 * abs(2 * 0.99 * math.log(0.99) - 0.01)
    assert positive == pytest.approx(0.265142, rel=1e-5) and negative == pytest.approx(2.24247e-6, rel=1e-5)
    assert pull_at_prior(2, 0.25, 22327) == pytest.approx(22327 * negative / positive, rel=1e-9)
    assert pull_at_prior(2, 0.25, 22327) == pytest.approx(0.18883, rel=1e-4)  # Table 1 at the endpoint: 0.19
