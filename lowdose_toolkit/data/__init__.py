"""Data: NIfTI/DICOM I/O and naming, manifests, normalisation, patch datasets, the phantom, the scan simulator
and challenge data preparation.
"""
