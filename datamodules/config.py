"""Schema of the ``data`` config section (owned by the data modules)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf


@dataclass
class DataConfig:
    # padchest | rsna | bct | folder | phantom_cxr | phantom_bct
    name: str = "folder"
    # Root of the real data set; None/"" = generate and use embedded phantom data (with a warning).
    root: str | None = None
    # cxr (2D radiographs) | bct (3D head CT volumes, brain window applied)
    modality: str = "cxr"
    # 2D input size (H = W); items of any size are resized to it.
    image_size: int = 1024
    # 3D input size (D, H, W) for volumes.
    volume_size: list[int] = field(default_factory=lambda: [32, 128, 128])
    # Labels file (PadChest CSV, RSNA labels CSV, BCT labels CSV); relative to root if not absolute.
    labels_csv: str | None = None
    class_csv: str | None = None
    fold: int = 0
    n_folds: int = 5
    split_seed: int = 0
    batch_size: int = 8
    num_workers: int = 0
    # PadChest policy for rows labelled 'exclude' / 'suboptimal study': drop | keep
    exclude_policy: str = "drop"
    # PadChest cohort: all (every Physician+PA image; the test set is then ~86 % abnormal) |
    # paper (Kim et al.'s 2,574 normal / 4,801 abnormal, sampled by patient, split_seed)
    cohort: str = "all"
    cohort_normal: int = 2574
    cohort_abnormal: int = 4801
    suboptimal_policy: str = "drop"
    # Set sizes for the flow method (paper Table 1 / Table 3); null = use all available.
    n_normal: int | None = None
    n_mixture_normal: int | None = None
    n_mixture_abnormal: int | None = None
    n_unknown_normal: int | None = None
    n_unknown_abnormal: int | None = None
    # S_mixture's normals may be shared with S_normal when too few unused normals are left (the
    # paper's S_mixture shares 6,529 of its 6,553 normals with S_normal). No val/test case is
    # ever in a training set; sizes larger than the data are scaled down (logged).
    mixture_overlap: bool = False
    # RSNA: extra labelled images (e.g. the stage-2 test images, where a site has labels for
    # them): a CSV patientId,class (classes as in stage_2_detailed_class_info.csv) and the
    # folder of their <patientId>.dcm, both relative to root if not absolute. The paper's
    # Table 1 sums to 29,684 = 26,684 training + 3,000 stage-2 test images.
    extra_class_csv: str | None = None
    extra_image_dir: str | None = None
    # Share of S_unknown (flow method) held out as the val split for thresholds.
    val_fraction: float = 0.15
    # Check every item before training: quick (headers / PNG CRCs, cached) | full (decode all)
    # | none. Unreadable items are skipped, counted and logged.
    verify: str = "quick"
    # Keep every loaded item, resized, as uint16 .npy under .cache/items/ (opt in: ~2 MB per
    # 1024^2 image) so later epochs skip decoding large PNG/DICOM files.
    cache_items: bool = False
    # Image folder for rsna (stage_2_train_images) relative to root; PadChest images are found
    # at <root>/<ImageDir>/<ImageID> or <root>/<ImageID>.
    image_dir: str | None = None
    # Phantom generation (used when root is empty).
    phantom_count: int = 48
    phantom_size: int = 256
    phantom_seed: int = 0


def data_config(cfg) -> DictConfig:
    """The ``data`` section typed by :class:`DataConfig`: a plain dict, dataclass or DictConfig
    is merged onto the schema (its defaults are the only ones; an unknown key fails)."""
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is DataConfig:
        return cfg
    return OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
