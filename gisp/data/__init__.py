"""Data: where text and task records come from (local files or the hub, chosen in one place), and the calibration
sets built from them (text windows, GSM8K pairs, multiple-choice questions)."""
