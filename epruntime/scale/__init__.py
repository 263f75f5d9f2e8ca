"""Scale simulator calibrated to published GPU figures: link presets (`links`), the time model
(`timemodel`), a FLOPs model (`compute`) and step-time projections (`project`).

    python -m epruntime.scale --shape deepseek-v3 --json projection.json
"""
