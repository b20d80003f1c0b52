"""Embedded phantom data: synthetic chest radiographs and head CTs written in the real on-disk
formats of PadChest, RSNA Pneumonia, head-CT DICOM series and the generic folder layout, so
the same reader code runs on real and demo data (README: "Data sets").

Pure generators: :func:`make_cxr`, :func:`make_head_ct`. Writers: :func:`write_padchest`,
:func:`write_rsna`, :func:`write_bct`, :func:`write_folder`. CLI::

    python -m datamodules.phantoms --format padchest|rsna|bct|folder --out DIR \\
        [--modality cxr|bct] [--n N] [--size S] [--seed K]
"""

from datamodules.phantoms.anatomy import (
    CT_LESIONS,
    CXR_LESIONS,
    PHANTOM_STYLES,
    make_cxr,
    make_head_ct,
)
from datamodules.phantoms.writers import (
    PADCHEST_COLUMNS,
    PADCHEST_CSV,
    RSNA_CLASSES,
    item_rng,
    mask_boxes,
    write_bct,
    write_cr_dicom,
    write_ct_series,
    write_folder,
    write_padchest,
    write_rsna,
)

__all__ = [
    "CT_LESIONS", "CXR_LESIONS", "PADCHEST_COLUMNS", "PADCHEST_CSV", "PHANTOM_STYLES",
    "RSNA_CLASSES",
    "item_rng", "make_cxr", "make_head_ct", "mask_boxes", "write_bct", "write_cr_dicom",
    "write_ct_series", "write_folder", "write_padchest", "write_rsna",
]
