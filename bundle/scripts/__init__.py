"""GF-Screen's bundle code. The modules in this package are what the configs reference (``_target_`` and ``$scripts.``
expressions): networks, GRPO maths, trainer, evaluator, inferer, transforms, handlers, metrics, data, loading,
post-processing, reports and DICOM output. Command-line tools that only people run live in ``scripts.cli``
(``python -m scripts.cli.<tool>`` from the bundle root); no config references them and nothing here imports them."""
