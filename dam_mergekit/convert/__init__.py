"""Bridges that bring real-world CLIP checkpoints into the layout mergekit merges.

* :mod:`dam_mergekit.convert.openclip`: open_clip visual tower <-> transformers
  ``CLIPVisionModelWithProjection`` (``dam-mergekit convert openclip`` / ``hf-to-openclip``);
* :mod:`dam_mergekit.convert.hf4`: transformers-4 ``vision_model.*`` names -> the names
  transformers 5 (and so mergekit 0.1.5) expects (``dam-mergekit convert hf4-vision``).
"""
