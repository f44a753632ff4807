"""The mask file stage: format, reader, writer, fingerprints and checks against a recipe."""

from dam_mergekit.masks.file import MaskFile, MaskSet, ModelRecord, write_mask_file
from dam_mergekit.masks.fingerprint import fingerprint_model

__all__ = ["MaskFile", "MaskSet", "ModelRecord", "fingerprint_model", "write_mask_file"]
