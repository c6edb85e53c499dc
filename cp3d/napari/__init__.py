"""napari plugin: segment or reconstruct cells from the viewer, TIFF with voxel sizes, sample data.

A thin layer over cp3d's public functions, declared in ``napari.yaml`` (npe2)
and registered through the ``napari.manifest`` entry point. Install with
``pip install "cp3d[napari]"``; napari is imported only by these modules.
"""
