"""Paper fidelity: the paper presets resolve to the papers' published settings.

Shibata et al., arXiv:2001.07847 (README "Fidelity" lists the values): RSNA sets Table 1,
head-CT sets Table 3, head-CT epochs Table 4 ("Train 1" 30, "Train 2" 20; our reading: M0, M1),
Glow sizes §3 / Appendix B, fictional images §4.1; optimiser: "the original Glow code"
(openai/glow: Adamax, linear warm-up) with "learning rate in steady state" 1e-3 (CXR) / 1e-4
(CT). Kim et al., Sci Rep 2023 (README "Fidelity"): patch sizes, ResNet-50, batch 256, 100 epochs,
LARS lr 4.8, weight decay 1e-6, locality d and the weights of eq. 6.
"""

from __future__ import annotations

import pytest

from experiments import pipeline_flow
from experiments.config import load_config

# (preset, modality): what the paper states for M0 and M1
SHIBATA = {
    "flow_rsna_paper": dict(
        sets=(7808, 6553, 6631, 1358, 13863),  # Table 1
        levels=7, steps=32, hidden=512, size=512, batch=128, n_bits=8,
        epochs={"m0": 200, "m1": 200}, lr=1e-3),
    "flow_bct_paper": dict(
        sets=(250, 250, 250, 33, 33),  # Table 3
        levels=4, steps=32, hidden=512, size=[32, 128, 128], batch=1, n_bits=7,
        epochs={"m0": 30, "m1": 20},  # Table 4: Train 1 = 30, Train 2 = 20
        lr=1e-4),
}


@pytest.mark.parametrize("preset", sorted(SHIBATA))
def test_flow_paper_presets_resolve_m0_and_m1_to_the_papers_tables(preset):
    paper = SHIBATA[preset]
    cfg = pipeline_flow.load([f"config={preset}", "profile=paper"])
    d = cfg.data
    assert (d.n_normal, d.n_mixture_normal, d.n_mixture_abnormal, d.n_unknown_normal,
            d.n_unknown_abnormal) == paper["sets"]
    subs = pipeline_flow.resolved_model_configs(cfg)
    assert set(subs) == {"m0", "m1"}
    for name, sub in subs.items():
        g, o = sub.glow, sub.optim
        assert g.model == name
        assert (g.levels, g.steps, g.hidden_channels) == (paper["levels"], paper["steps"],
                                                          paper["hidden"])
        size = list(sub.data.volume_size) if d.modality == "bct" else sub.data.image_size
        assert size == paper["size"] and sub.data.batch_size == paper["batch"]
        assert g.n_bits == paper["n_bits"]
        assert g.coupling_scale == "paper"  # sigma(h - 0.1) + 0.6
        assert sub.trainer.max_epochs == paper["epochs"][name]
        # "the original Glow code": Adamax, linear warm-up to the steady-state lr, its coupling
        # network, no gradient clipping
        assert (o.name, o.scheduler, o.lr) == ("adamax", "warmup", paper["lr"])
        assert o.warmup_epochs == 10  # openai/glow's default (paper silent): ours
        assert o.grad_clip is None and g.coupling_net == "openai"
        # fixed training length: the last epoch, every training image trained on
        assert g.select == "last" and g.val_fraction == 0.0
        # the published method: independent models, M1 from scratch, global posterior score
        assert (g.schedule, g.m1_init, g.score, g.intensity_norm, g.align) == (
            "independent", "scratch", "global", "none", "none")
    assert subs["m0"].glow.model == "m0" and subs["m1"].glow.model == "m1"


def test_print_config_shows_the_resolved_m0_and_m1(capsys):
    assert pipeline_flow.main(["--print-config", "config=flow_bct_paper", "profile=paper"]) is None
    out = capsys.readouterr().out
    m0, m1 = out.split("# --- M1 ---")
    assert "# --- M0 ---" in m0 and "max_epochs: 30" in m0 and "max_epochs: 20" in m1
    assert "name: adamax" in m0 and "scheduler: warmup" in m1


def test_cpu_profile_keeps_todays_recipe():
    """make demo's numbers depend on these: Adam, no schedule, clipping 50, normflows' NN()."""
    for modality in ("cxr", "bct"):
        cfg = pipeline_flow.load(["data=folder", f"data.modality={modality}", "profile=cpu"])
        for name, sub in pipeline_flow.resolved_model_configs(cfg).items():
            assert (sub.optim.name, sub.optim.scheduler, sub.optim.grad_clip) == (
                "adam", "none", 50.0)
            assert sub.glow.coupling_net == "normflows" and sub.glow.select == "best"
            # head CT: M0 three times M1's 12 epochs (glow_bct.yaml: M0 got half M1's steps)
            want = 30 if modality == "cxr" else (36 if name == "m0" else 12)
            assert sub.trainer.max_epochs == want, (modality, name)
            # pose alignment (ours) for chest images only (head CT measured worse with it)
            assert sub.glow.align == ("similarity" if modality == "cxr" else "none")
            assert sub.glow.select_align == (modality == "cxr")


def test_fictional_image_preset_is_section_4_1():
    from experiments.sample_glow import load

    cfg, _ = load(["modality=bct", "profile=paper"])
    assert cfg.data.n_normal == 1355 and list(cfg.data.volume_size) == [32, 64, 64]
    assert (cfg.glow.rotation_copies, cfg.glow.rotation_deg) == (7, 2.0)


# --- Kim et al. --------------------------------------------------------------------------------

@pytest.mark.parametrize("res", [128, 256, 512, 1024])
def test_simclr_paper_profile_is_the_papers_recipe_with_chunks_at_512_and_1024(res):
    from lightning_modules.simclr.config import resolved_chunk_size

    cfg = load_config(["simclr", "patch"], ["profile=paper", f"simclr.patch_size={res}"])
    s, o, t = cfg.simclr, cfg.optim, cfg.trainer
    assert (s.backbone, cfg.data.batch_size, t.max_epochs, t.devices) == ("resnet50", 256, 100, 4)
    assert (o.name, o.lr, o.weight_decay) == ("lars", 4.8, 1e-6)
    assert list(cfg.patch.patch_sizes) == [128, 256, 512, 1024]
    assert list(cfg.patch.locality) == [2, 1, 0, 0]
    assert list(cfg.patch.weights) == [0.1, 1.2, 1.2, 1.0]  # eq. 6, Table 3's best
    assert s.input_size is None  # full-resolution patches
    # ours: chunked NT-Xent at 512 / 1024 (per GPU 64 patches = 128 views)
    assert resolved_chunk_size(s) == {128: None, 256: None, 512: 32, 1024: 16}[res]


@pytest.mark.parametrize("res,chunk", [(512, 32), (1024, 16)])
def test_chunk_sizes_of_the_paper_profile_fit_an_80_gb_gpu_with_margin(res, chunk):
    from experiments.benchmarks.simclr_chunk_memory import memory_table

    row, = memory_table("resnet50", 64, chunk, [res])  # 64 patches per GPU (256 / 4)
    assert row["full_GiB"] > 74.5  # one pass does not fit 80 GB = 74.5 GiB
    assert row["chunk_GiB"] < 0.6 * 74.5  # the chunked step leaves > 40 % for the rest


def test_patch_paper_profile_is_the_published_method_with_every_option_of_ours_off():
    """Kim et al.: sizes 128-1024 on 1024² images, d = (2, 1, 0, 0), eq. 6's weights
    (0.1, 1.2, 1.2, 1.0), Mahalanobis, image score = max of A_final; none of our options (the
    cpu profile's dense cells, rank normalisation, cell z-score, validation-chosen weights and
    pose alignment) is on."""
    from experiments import pipeline_patch

    p = pipeline_patch.load(["profile=paper"]).patch
    assert list(p.patch_sizes) == [128, 256, 512, 1024] and list(p.locality) == [2, 1, 0, 0]
    assert list(p.weights) == [0.1, 1.2, 1.2, 1.0] and p.distance == "mahalanobis"
    assert p.image_score == "max" and p.stride_fraction == 1.0
    assert (p.features, p.intensity_norm, p.align) == ("pooled", "none", "none")
    assert not (p.cell_zscore or p.cell_normalize or p.select_weights or p.reference_shift)
    cpu = pipeline_patch.load(["profile=cpu"]).patch  # the options the cpu profile turns on
    assert (cpu.features, cpu.intensity_norm, cpu.align) == ("dense", "rank", "similarity")
    assert list(cpu.dense_layers) == ["layer1"] and cpu.dense_pool == 1  # 4-pixel cells
    assert list(cpu.locality) == [0, 0, 0, 0]  # the window matters less once images are aligned
    assert cpu.cell_zscore and cpu.select_weights
