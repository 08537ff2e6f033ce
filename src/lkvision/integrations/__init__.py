"""Adapters for the frameworks users bring (imported lazily, only from here).

* :mod:`lkvision.integrations.mmdet` / :mod:`lkvision.integrations.mmseg`: OpenMMLab 3.x (mmdet 3.3, mmseg 1.2)
  registrations -- ``custom_imports = dict(imports=["lkvision.integrations.mmdet"])`` in a config, then
  ``backbone=dict(type="LKVisionBackbone", model_name="sw_tiny")``. Needs ``pip install "lkvision[mm]"``.
* :mod:`lkvision.integrations.backbone`: the framework-neutral part (building with the official downstream output
  norms, loading lkvision / official checkpoints, freezing, layer-decay ids).

``import lkvision`` imports none of these.
"""
