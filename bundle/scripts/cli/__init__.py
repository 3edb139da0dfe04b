"""Command-line tools, run from the bundle root as ``python -m scripts.cli.<tool>``: ``screen`` (screen scans and
write reports, masks and DICOM), ``prepare_data``, ``sweep`` (choose thresholds on the validation split),
``benchmark``, ``ablation``, ``pack`` (model-zoo zip) and ``synthesis_gallery``; ``startup`` only serves ``screen``."""
