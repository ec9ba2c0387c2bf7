"""adamnp.distributed under a real MPI: tests/mpi_job.py at 1, 2, 3 and 4 ranks (mpiexec from
the ``mpich`` wheel of the test extra), in that order, each loading the checkpoints the
earlier jobs saved: bit-identity with one process, errors raised on every rank, and
resharding from every earlier number of ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py")


def _mpiexec() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


@pytest.mark.skipif(_mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_mpi_jobs_at_1_to_4_ranks(tmp_path):
    job = os.path.join(os.path.dirname(__file__), "mpi_job.py")
    for n in (1, 2, 3, 4):
        run = subprocess.run(
            [_mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", job, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, f"{n} ranks:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        assert f"mpi_job: {n} ranks ok" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        f"ckpt-{n}" for n in (1, 2, 3, 4)
    ]
