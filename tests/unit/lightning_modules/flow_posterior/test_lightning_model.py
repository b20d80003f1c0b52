"""The flow posterior's lifecycle module: validate fixes the threshold, test/predict score."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.flow_posterior.lightning_model import FlowPosteriorModule
from lightning_modules.flow_posterior.scoring import score_batches
from lightning_modules.thresholds import decision_threshold
from tests.support import VectorFlow


def _loader(x, y=None, batch_size=4):
    from torch.utils.data import DataLoader

    items = [{"image": xi} if y is None else {"image": xi, "label": yi}
             for xi, yi in zip(x, y if y is not None else x)]
    return DataLoader(items, batch_size=batch_size)


def _trainer():
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False)


def test_validate_fixes_the_threshold_and_test_scores_like_the_scorer():
    g = torch.Generator().manual_seed(0)
    m0, m1 = VectorFlow(64, 0), VectorFlow(64, 1)
    xv, yv = torch.rand(10, 1, 8, 8, generator=g), torch.tensor([0, 1] * 5)
    xt, yt = torch.rand(7, 1, 8, 8, generator=g), torch.tensor([0, 0, 0, 1, 1, 1, 1])
    module = FlowPosteriorModule(m0, m1, maps=False)
    trainer = _trainer()
    trainer.validate(module, _loader(xv, yv), verbose=False)
    want = score_batches(m0, m1, _loader(xv, yv), progress=False)
    thr, how = decision_threshold(yv.numpy(), want.score)
    assert module.threshold == thr and "Youden" in how
    trainer.test(module, _loader(xt, yt), verbose=False)
    direct = score_batches(m0, m1, _loader(xt, yt), progress=False)
    np.testing.assert_allclose(module.test_result.log_posterior, direct.log_posterior)
    # the threshold travels in the state dict
    other = FlowPosteriorModule(VectorFlow(64, 0), VectorFlow(64, 1), maps=False)
    other.load_state_dict(module.state_dict())
    assert other.threshold == thr and other.threshold_source == how
    pred = trainer.predict(module, _loader(xt, batch_size=7))
    np.testing.assert_allclose(pred[0]["score"], direct.score, rtol=1e-6)


def test_val_of_normals_only_uses_the_normal_quantile(caplog):
    m0, m1 = VectorFlow(64, 0), VectorFlow(64, 1)
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    module = FlowPosteriorModule(m0, m1, maps=False)
    _trainer().validate(module, _loader(x, torch.zeros(20, dtype=torch.long)), verbose=False)
    assert module.threshold == pytest.approx(np.quantile(module.val_result.score, 0.95))
    assert "no abnormal images" in caplog.text


def _scores(n=12, seed=0):
    """n normal + n abnormal: log p(x|M0) separates them, the posterior does not (M1 follows
    M0), and the map's score separates them the other way round."""
    from lightning_modules.flow_posterior.scoring import FlowScores

    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    l0 = -1000.0 - 50.0 * y + rng.normal(0, 5, 2 * n)
    l1 = l0 + rng.normal(0, 5, 2 * n)  # the posterior is noise
    s = FlowScores(l0, l1, np.zeros(2 * n))
    s.map_image_score = -y + rng.normal(0, 0.1, 2 * n)  # anti-informative map
    return s, y


@pytest.mark.parametrize("maps", [False, True])
def test_select_score_takes_the_best_validation_score(maps):
    m0, m1 = VectorFlow(64, 0), VectorFlow(64, 1)
    module = FlowPosteriorModule(m0, m1, maps=maps, select_score=True)
    val, y = _scores()
    if not maps:
        val.map_image_score = None
    module.select_score(val, y)
    assert module.hparams.score == "likelihood"
    np.testing.assert_array_equal(val.score, val.score_likelihood)
    assert list(module.score_selection) == (["global", "local", "likelihood"] if maps
                                            else ["global", "likelihood"])
    assert module.score_selection["likelihood"] == 1.0
    if maps:
        assert module.score_selection["local"] == 0.0
        assert "score_local" in val.columns() and "score_global" in val.columns()
    # the choice is a hyper-parameter: a module built from them scores the same way
    again = FlowPosteriorModule(m0, m1, **{k: v for k, v in module.hparams.items()
                                           if k != "glows"})
    assert again.hparams.score == "likelihood"


def test_select_score_keeps_the_configured_score_on_a_small_val_set():
    module = FlowPosteriorModule(VectorFlow(64, 0), VectorFlow(64, 1), maps=True,
                                 score="local", select_score=True)
    val, y = _scores(n=9)
    val.use("local")
    module.select_score(val, y)
    assert module.hparams.score == "local" and module.score_selection["likelihood"] == 1.0
    np.testing.assert_array_equal(val.score, val.local_score)
    val.use("global")  # and back: the map's score is kept as a column
    np.testing.assert_array_equal(val.score, val.score_global)
    assert val.local_score is None and "score_local" in val.columns()
