"""Lightning pieces: the scoring passes (validation loops), the calibration data module and the pruning callbacks."""
