"""Data sets: PadChest, RSNA Pneumonia, head-CT DICOM series, a generic folder layout, phantoms."""
