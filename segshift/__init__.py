"""segshift: domain-adaptive semantic segmentation pipelines (GTA5/SYNTHIA -> Cityscapes).

The library lives in `segshift.components` (folder `components/`), the stages and the
command line in `segshift.pipelines` (folder `pipelines/`).
"""
__version__ = "0.1.0"
