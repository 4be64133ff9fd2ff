"""One CSV of metrics per run dir, across invocations: a resumed or re-run job appends to `<run>/csv/metrics.csv`.

Lightning's CSVLogger starts a new `version_N` folder per invocation (a resumed run's curves end up split over
folders, the dense metrics only in the first) and deletes `metrics.csv` when a version folder is reused. This logger
keeps one folder and appends; when a later invocation logs new columns, the header is rewritten with the old rows.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing metrics file (Lightning deletes it) and learn its columns."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = sorted(next(csv.reader(fh), []))


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `<save_dir>/<name>/metrics.csv` (+ hparams.yaml), appended to by every invocation."""

    def __init__(self, save_dir: str, name: str = "csv", **kwargs: Any) -> None:
        kwargs.pop("version", None)
        super().__init__(save_dir, name=name, version="", **kwargs)

    def drop_steps_from(self, step: int) -> None:
        """Remove the rows of `step` and later (a resumed fit logs them again), atomically."""
        from gisp.io import write_text_atomic

        path = self.experiment.metrics_file_path
        if not self._fs.isfile(path):
            return
        with self._fs.open(path, "r", newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or "step" not in rows[0]:
            return
        at = rows[0].index("step")
        kept = [rows[0], *(r for r in rows[1:] if not (r[at] and int(float(r[at])) >= step))]
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(kept)
        write_text_atomic(path, out.getvalue())

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
