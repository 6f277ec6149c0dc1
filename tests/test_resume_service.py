"""A training task killed mid-phase resumes on another "node": an empty local folder, the checkpoint on S3.

Each training runs in a process of its own, as a pod would, against a real
SeaweedFS. The killed one is stopped by SIGKILL right after an epoch was
written (what an evicted pod leaves); its restart starts from a fresh local
folder, finds the mirror, and must end with the very weights of a run that was
never stopped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from science_fixtures import write_dataset
from services import seaweedfs

pytestmark = [pytest.mark.service, pytest.mark.slow]

TRAIN = """
import os, signal, sys
from dataclasses import replace
from ferpipe.crossval.train_eval import load_fold
from ferpipe.data.storage import open_store
from ferpipe.model.profiles import SMOKE
from ferpipe.model.training import member_by_slot, train_member

dataset, local, mirror, out = sys.argv[1:5]
kill_at = os.environ.get("KILL_AT")
profile = replace(SMOKE, landmark_epochs=3, head_epochs=3, finetune_epochs=3, patience=10)
fold = load_fold(dataset, 0, profile)

def progress(line):
    print(line, flush=True)
    if kill_at and kill_at in line:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no last write: a pod evicted

trained = train_member(member_by_slot("el", "mouth"), fold.train, fold.val, profile, local, progress,
                       open_store(mirror))
trained.model.save_weights(out)
"""


def train(args, env, kill_at=None):
    env = {**env, **({"KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([sys.executable, "-c", TRAIN, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def weights(path: Path) -> list[np.ndarray]:
    import h5py

    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_a_killed_training_resumes_from_the_object_store_with_the_same_weights(tmp_path):
    dataset = write_dataset(tmp_path / "data", subjects=8, per_class=2, folds=4)
    (tmp_path / "seaweed").mkdir()
    with seaweedfs(tmp_path / "seaweed") as s3:
        env = {**os.environ, **s3.env(), "TF_CPP_MIN_LOG_LEVEL": "2"}
        whole = train([dataset, tmp_path / "node0", "s3://ferpipe/work/run-a/mouth", tmp_path / "whole.weights.h5"],
                      env)
        assert whole.returncode == 0, whole.stderr[-2000:]

        mirror = "s3://ferpipe/work/run-b/mouth"
        killed = train([dataset, tmp_path / "node1", mirror, tmp_path / "never.weights.h5"], env,
                       kill_at=" head epoch 2/")
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not (tmp_path / "never.weights.h5").exists()

        resumed = train([dataset, tmp_path / "node2", mirror, tmp_path / "resumed.weights.h5"], env)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = resumed.stdout.splitlines()
    assert "checkpoint restored from s3://ferpipe/work/run-b/mouth" in lines[0]
    assert "head: resuming after epoch 2" in resumed.stdout
    assert not [line for line in lines if " landmarks epoch" in line]  # the finished phase is not redone
    state = json.loads((tmp_path / "node2" / "state.json").read_text())
    assert [(r["phase"], r["epoch"]) for r in state["history"]][:5] == [
        ("landmarks", 1), ("landmarks", 2), ("landmarks", 3), ("head", 1), ("head", 2)]
    for a, b in zip(weights(tmp_path / "whole.weights.h5"), weights(tmp_path / "resumed.weights.h5"), strict=True):
        np.testing.assert_array_equal(a, b)
