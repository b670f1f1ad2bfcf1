"""④ Assess: metrics and their intervals, calibration, subgroups, consistency, external validation, Grad-CAM,
`melanoma evaluate`, the run report and the model card."""
