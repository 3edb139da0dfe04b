"""Active learning: next, the unlabelled image whose Glance decisions are least certain."""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..scoring.glance_uncertainty import SCORE_KEY

logger = logging.getLogger(__name__)


class GlanceUncertainty(Strategy):
    """Pick the unlabelled image with the highest stored Glance uncertainty (see
    :class:`lib.scoring.glance_uncertainty.GlanceUncertaintyScoring`); ties and images not scored yet (ranked
    last) go by id, so the choice is reproducible."""

    def __init__(self) -> None:
        super().__init__("Image whose Glance window probabilities sit closest to the keep threshold")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scores = {image: datastore.get_image_info(image).get(SCORE_KEY, -1.0) for image in images}
        image = min(images, key=lambda i: (-scores[i], i))
        logger.info(f"glance_uncertainty: selected {image} (score {scores[image]:.3f}) of {len(images)} unlabelled")
        return {"id": image, SCORE_KEY: scores[image]}
