"""Lightning logs GlobalLoss through ``self.log`` on 2 CPU processes and gets the global mean."""

import json
import os
import sys
from pathlib import Path

import pytest

TIMEOUT = 240


def test_lightning_logs_the_sample_weighted_global_loss(tmp_path, command):
    app = Path(__file__).with_name("lightning_app.py")
    env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    command([sys.executable, str(app), str(tmp_path)], env, TIMEOUT)

    seen = [json.loads((tmp_path / f"seen{rank}.json").read_text()) for rank in (0, 1)]
    assert [batch for _, batch in seen[0]] == [5, 5, 5]
    assert [batch for _, batch in seen[1]] == [7, 7, 4]
    pairs = seen[0] + seen[1]
    expected = sum(loss * batch for loss, batch in pairs) / sum(batch for _, batch in pairs)
    unweighted = sum(loss for loss, _ in pairs) / len(pairs)
    logged = json.loads((tmp_path / "logged.json").read_text())
    assert logged["train_loss"] == pytest.approx(expected, rel=1e-6)
    assert logged["train_loss"] != pytest.approx(unweighted, rel=1e-6)
