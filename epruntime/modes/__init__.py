"""MoDES (arXiv 2511.15690): training-free, dual-modality expert skipping at inference.

- skip.py         the score alpha[layer, modality] x routing weight, the two thresholds, and the
                  ExpertSkipper every router hands its eval-mode routing to
                  (through its routing hook, epruntime.model.routing_hooks)
- calibration.py  the calibration file (alpha, thresholds, the model it belongs to)
- search.py       frontier searches over the two threshold grids (pure)
- calibrate.py    alpha and the thresholds from training samples; `python -m
                  epruntime.modes.calibrate` (config section `modes`)
"""

from epruntime.modes.skip import ExpertSkipper, drop_pairs, skip_pairs

__all__ = ["ExpertSkipper", "drop_pairs", "skip_pairs"]
