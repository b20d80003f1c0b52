"""Flow posterior (Shibata et al., arXiv 2001.07847): the equation, the scorer, the checks, and
the Appendix A effect with analytic stand-in density models (fast tier)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.flow_posterior import (
    FlowScores,
    PreprocessingMismatch,
    check_models,
    check_same_preprocessing,
    likelihood_score,
    log_posterior,
    posterior_score,
    preprocessing_signature,
    score_batches,
    zero_fraction,
)
from lightning_modules.flow_posterior.posterior import bits_per_dim
from tests.support import HP, MapModel, VectorFlow, auroc, fit_flow, phantom_set


class HistogramModel:
    """Analytic stand-in for a flow: i.i.d. pixels with a smoothed histogram density on [0, 1]
    (bins = the 2^n_bits quantisation levels). log p(x) = sum_i log q(x_i). Like a real flow it
    gives empty background pixels a high density, so the background dominates log p(x)."""

    def __init__(self, images: torch.Tensor, n_bits: int = 8):
        self.levels = 2**n_bits
        counts = torch.bincount(self._bins(images).flatten(), minlength=self.levels).double()
        probs = (counts + 1.0) / (counts.sum() + self.levels)  # Laplace smoothing
        self.log_density = (probs * self.levels).log()  # density of a bin of width 1/levels
        self.hparams = {"input_shape": tuple(images.shape[1:]), "n_bits": n_bits}

    def _bins(self, x: torch.Tensor) -> torch.Tensor:
        return (x * (self.levels - 1)).round().long().clamp(0, self.levels - 1)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_density[self._bins(x)].flatten(1).sum(1)  # (B,)


# --- the equation ------------------------------------------------------------------------------

def test_log_posterior_is_difference_of_log_likelihoods_plus_prior():
    lp0 = torch.tensor([-10.0, -3.0, 5.0])
    lp1 = torch.tensor([-12.0, -1.0, 5.0])
    assert torch.equal(log_posterior(lp0, lp1), torch.tensor([2.0, -2.0, 0.0]))
    assert torch.allclose(log_posterior(lp0, lp1, math.log(0.5)),
                          torch.tensor([2.0, -2.0, 0.0]) + math.log(0.5))
    # Higher score = more anomalous: the least normal image scores highest.
    s = posterior_score(log_posterior(lp0, lp1))
    assert int(s.argmax()) == 1
    assert torch.equal(likelihood_score(lp0), -lp0)


def test_log_posterior_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="same shape"):
        log_posterior(np.zeros(3), np.zeros(4))


def test_posterior_equals_bayes_rule_for_known_densities():
    """With the true class-conditional densities (two Gaussians) and M1 = the true mixture,
    log p(x|M0) - log p(x|M1) + log p(normal) is the exact Bayes posterior."""
    pi = 0.3
    normal, abnormal = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(2.0, 0.5)
    x = torch.linspace(-3, 4, 50)
    lp0 = normal.log_prob(x)
    lp1 = torch.logaddexp(math.log(pi) + lp0, math.log(1 - pi) + abnormal.log_prob(x))
    exact = math.log(pi) + lp0 - lp1  # log [pi p0 / (pi p0 + (1-pi) p1)]
    assert torch.allclose(log_posterior(lp0, lp1, math.log(pi)), exact, atol=1e-6)
    assert (log_posterior(lp0, lp1, math.log(pi)) <= 1e-6).all()  # a probability


def test_zero_fraction_counts_pixels_that_quantise_to_zero():
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, :2] = 0.5  # half of the pixels non-zero
    x[1, 0, 0, 0] = 0.4 / 255  # rounds to 0 at 8 bits
    x[1, 0, 0, 1] = 0.6 / 255  # rounds to 1
    assert torch.allclose(zero_fraction(x, 8), torch.tensor([0.5, 15 / 16]))
    assert zero_fraction(torch.zeros(3, 1, 2, 4, 4)).shape == (3,)  # volumes


def test_bits_per_dim_of_uniform_density_is_n_bits():
    # The uniform density on [0,1]^n has log p = 0: n_bits bits per dimension.
    assert bits_per_dim(np.array([0.0]), 100, 8)[0] == pytest.approx(8.0)


# --- preprocessing checks ----------------------------------------------------------------------

def test_signature_reads_nested_hparams_and_keeps_the_modality_size():
    sig = preprocessing_signature(HP)
    assert sig == {"input_shape": (1, 8, 8), "n_bits": 8, "modality": "cxr", "image_size": 8}
    sig3d = preprocessing_signature({"data": {"modality": "bct", "image_size": 8,
                                              "volume_size": [4, 8, 8]}})
    assert sig3d == {"modality": "bct", "volume_size": (4, 8, 8)}


def test_mismatched_models_fail_naming_the_keys():
    m0 = VectorFlow(64, 0)
    other = {**HP, "glow": {"n_bits": 7}, "data": {**HP["data"], "image_size": 16}}
    m1 = VectorFlow(64, 1, hparams=other)
    with pytest.raises(PreprocessingMismatch) as e:
        check_models(m0, m1)
    msg = str(e.value)
    assert "n_bits (M0: 8, M1: 7)" in msg and "image_size (M0: 8, M1: 16)" in msg
    assert "input_shape" not in msg and "modality" not in msg
    # one Glow fed pixel ranks (glow.intensity_norm=rank), the other raw values: refused too
    ranked = VectorFlow(64, 1, hparams={**HP, "glow": {"intensity_norm": "rank"}})
    plain = VectorFlow(64, 0, hparams={**HP, "glow": {"intensity_norm": "none"}})
    with pytest.raises(PreprocessingMismatch, match=r"intensity_norm \(M0: 'none', M1: 'rank'\)"):
        check_models(plain, ranked)


def test_models_must_match_the_data_config():
    m0, m1 = VectorFlow(64, 0), VectorFlow(64, 1)
    assert check_models(m0, m1, {"modality": "cxr", "image_size": 8}, 8, (1, 8, 8))["n_bits"] == 8
    with pytest.raises(PreprocessingMismatch, match=r"image_size \(M0: 8, M1: 8, data config: 32"):
        check_models(m0, m1, {"modality": "cxr", "image_size": 32}, 8)
    with pytest.raises(PreprocessingMismatch, match="modality"):
        check_same_preprocessing({"M0": {"modality": "cxr"}, "M1": {"modality": "bct"}})


# --- the scorer --------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 5, 13])
def test_scorer_equals_independent_model_calls(batch_size):
    m0, m1 = VectorFlow(64, 0), VectorFlow(64, 1)
    x = torch.rand(13, 1, 8, 8)
    x[:4, :, :3] = 0.0
    loader = [{"image": x[i:i + batch_size]} for i in range(0, len(x), batch_size)]
    got = score_batches(m0, m1, loader, progress=False)
    with torch.no_grad():  # one item at a time, directly through normflows
        direct0 = torch.stack([m0.flow.log_prob(xi.flatten()[None])[0] for xi in x]).double()
        direct1 = torch.stack([m1.flow.log_prob(xi.flatten()[None])[0] for xi in x]).double()
    assert (direct0 - direct1).abs().max() > 1.0  # the two models really differ
    np.testing.assert_allclose(got.log_p_m0, direct0.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.log_p_m1, direct1.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.log_posterior, (direct0 - direct1).numpy(), rtol=1e-5,
                               atol=2e-4)
    np.testing.assert_allclose(got.score, -got.log_posterior)
    np.testing.assert_allclose(got.score_likelihood, -got.log_p_m0)
    np.testing.assert_allclose(got.zero_fraction[:4], 3 / 8)
    assert set(got.columns()) == {"log_p_m0", "log_p_m1", "log_posterior", "score_likelihood",
                                  "zero_fraction"}


def test_scorer_accepts_plain_tensors_and_empty_input():
    m0, m1 = VectorFlow(64, 0), VectorFlow(64, 1)
    got = score_batches(m0, m1, [torch.rand(3, 1, 8, 8)], progress=False)
    assert len(got) == 3
    assert len(score_batches(m0, m1, [], progress=False)) == 0


def test_scorer_fails_on_non_finite_likelihoods():
    class Broken(VectorFlow):
        def log_likelihood(self, x):
            out = super().log_likelihood(x)
            out[1] = float("nan")
            return out

    with pytest.raises(FloatingPointError, match=r"M1 .* 1 of 4 items \(positions \[1\]"):
        score_batches(VectorFlow(64, 0), Broken(64, 1), [torch.rand(4, 1, 8, 8)], progress=False)


# --- Appendix A: the background dominates the likelihood, the posterior cancels it -------------


def test_likelihood_auroc_falls_below_posterior_auroc_analytic():
    rng = np.random.default_rng(0)
    s_normal, _ = phantom_set(rng, 200, 0)
    s_mixture, _ = phantom_set(rng, 100, 100)  # labels unused: M1 never sees them
    s_unknown, labels = phantom_set(rng, 100, 100)
    m0, m1 = HistogramModel(s_normal), HistogramModel(s_mixture)
    scores = score_batches(m0, m1, [s_unknown], progress=False)
    auroc_post = auroc(scores.score, labels)
    auroc_lik = auroc(scores.score_likelihood, labels)
    # The likelihood is dominated by the empty background: abnormal images, with more zero
    # pixels, look *more* likely than normal ones (paper: AUROC below 0.5).
    assert auroc_lik < 0.5 < auroc_post
    assert auroc_post > 0.7
    # ... and log p(x|M0) rises with the fraction of zero pixels (paper, Fig. A.20).
    rho = np.corrcoef(scores.zero_fraction, scores.log_p_m0)[0, 1]
    assert rho > 0.5


def test_flow_scores_prior_shifts_but_does_not_reorder():
    s = FlowScores(np.array([1.0, 2.0]), np.array([0.0, 0.0]), np.zeros(2))
    shifted = FlowScores(s.log_p_m0, s.log_p_m1, s.zero_fraction, log_prior_normal=-0.7)
    np.testing.assert_allclose(shifted.log_posterior, s.log_posterior - 0.7)
    assert np.argsort(shifted.score).tolist() == np.argsort(s.score).tolist()


def _train_tiny_glow(x: torch.Tensor, steps: int, seed: int):
    """A tiny project Glow (GlowModule) fitted by maximum likelihood with a plain loop."""
    from lightning_modules.glow import GlowModule, dequantize

    torch.manual_seed(seed)
    m = GlowModule({"levels": 2, "steps": 4, "hidden_channels": 32, "coupling_scale": "paper"},
                   list(x.shape[1:]), n_bits=8, data={"modality": "cxr", "image_size": 16})
    m.model.initialize_actnorm(dequantize(x[:64], 8, noise=True))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (32,))]  # (32, 1, 16, 16)
        loss = -m._log_p_discrete(batch, noise=True).mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_likelihood_auroc_falls_below_posterior_auroc_trained_glows():
    """The same Appendix A effect with two real (tiny) Glows trained on S_normal / S_mixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to oversubscription
    try:
        rng = np.random.default_rng(0)
        s_normal, _ = phantom_set(rng, 128, 0)
        s_mixture, _ = phantom_set(rng, 64, 64)
        s_unknown, labels = phantom_set(rng, 64, 64)
        m0 = _train_tiny_glow(s_normal, 200, seed=0)
        m1 = _train_tiny_glow(s_mixture, 200, seed=1)
        scores = score_batches(m0, m1, [s_unknown], progress=False)
    finally:
        torch.set_num_threads(threads)
    # the scorer is the difference of the two models' own log-likelihoods
    np.testing.assert_allclose(
        scores.log_posterior,
        (m0.log_likelihood(s_unknown) - m1.log_likelihood(s_unknown)).double().numpy(),
        rtol=1e-5, atol=1e-2)
    auroc_post = auroc(scores.score, labels)
    auroc_lik = auroc(scores.score_likelihood, labels)
    assert auroc_lik < 0.5 < auroc_post
    assert auroc_post - auroc_lik > 0.2
    assert np.corrcoef(scores.zero_fraction, scores.log_p_m0)[0, 1] > 0.5


# --- local score and anomaly map (our addition) ------------------------------------------------

def test_unsmoothed_anomaly_map_sums_to_minus_log_posterior():
    from lightning_modules.flow_posterior import anomaly_map

    rng = np.random.default_rng(0)
    l0, l1 = rng.normal(size=(3, 4, 4)), rng.normal(size=(3, 4, 4))
    a = anomaly_map(l0, l1)
    np.testing.assert_allclose(a.reshape(3, -1).sum(1),
                               posterior_score(log_posterior(l0.reshape(3, -1).sum(1),
                                                             l1.reshape(3, -1).sum(1))))
    # smoothing acts over the spatial axes only: a constant image stays constant
    c = anomaly_map(np.zeros((2, 5, 5, 5)), np.ones((2, 5, 5, 5)) * np.array([1.0, 3.0])[:, None,
                                                                              None, None], 1.5)
    np.testing.assert_allclose(c[0], 1.0)
    np.testing.assert_allclose(c[1], 3.0)


def test_map_score_is_mean_of_top_fraction():
    from lightning_modules.flow_posterior import map_score

    a = np.arange(200.0).reshape(2, 10, 10)
    np.testing.assert_allclose(map_score(a, 0.05), [97.0, 197.0])  # top 5 of 100
    np.testing.assert_allclose(map_score(a, 1e-6), [99.0, 199.0])  # at least the maximum
    with pytest.raises(ValueError, match="top_fraction"):
        map_score(a, 0.0)


def test_scorer_local_score_uses_the_map():
    from lightning_modules.flow_posterior import anomaly_map, map_score

    m0 = MapModel(lambda x: -(x - 0.5) ** 2)
    m1 = MapModel(lambda x: -(x - 0.6) ** 2)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    g = score_batches(m0, m1, [x], progress=False)
    loc = score_batches(m0, m1, [x], progress=False, score="local", map_sigma=1.0,
                        map_top_fraction=0.05)
    # with maps log p is the map's sum: the same up to float32 rounding of the log-likelihoods
    np.testing.assert_allclose(g.score, loc.score_global, rtol=0, atol=1e-5)
    expect = map_score(anomaly_map(-(x[:, 0] - 0.5) ** 2, -(x[:, 0] - 0.6) ** 2, 1.0), 0.05)
    np.testing.assert_allclose(loc.score, expect, rtol=1e-6)
    assert loc.anomaly_map.shape == (5, 8, 8) and "score_global" in loc.columns()
    assert g.anomaly_map is None and "score_global" not in g.columns()
    with pytest.raises(ValueError, match="score="):
        score_batches(m0, m1, [x], progress=False, score="max")


def test_quality_guard_matched_glows_with_local_score_detect_and_noise_does_not():
    """Quality guard: two real tiny Glows trained with the matched schedule (a shared start
    on S_normal, then the same number of steps on S_normal for M0 and on S_mixture for M1)
    separate normal from abnormal phantoms with the local score; a control whose likelihood
    maps are noise stays at chance."""
    import copy

    from lightning_modules.glow import GlowModule

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        gen = torch.Generator().manual_seed(0)
        s_normal, _ = phantom_set(rng, 128, 0)
        s_mixture, _ = phantom_set(rng, 64, 64)
        s_unknown, labels = phantom_set(rng, 64, 64)
        torch.manual_seed(0)
        start = fit_flow(GlowModule({"levels": 2, "steps": 2, "hidden_channels": 16},
                                [1, 16, 16], n_bits=8), s_normal, 150, gen)
        m0 = fit_flow(copy.deepcopy(start), s_normal, 100, gen)
        m1 = fit_flow(copy.deepcopy(start), s_mixture, 100, gen)
        scores = score_batches(m0, m1, [s_unknown], progress=False, score="local",
                               map_sigma=1.0, map_top_fraction=0.02)
        noise = torch.Generator().manual_seed(1)
        n0 = MapModel(lambda x: torch.randn(x.shape, generator=noise, dtype=torch.float64))
        n1 = MapModel(lambda x: torch.randn(x.shape, generator=noise, dtype=torch.float64))
        control = score_batches(n0, n1, [s_unknown], progress=False, score="local")
    finally:
        torch.set_num_threads(threads)
    assert auroc(scores.score, labels) > 0.8
    assert 0.3 < auroc(control.score, labels) < 0.7
