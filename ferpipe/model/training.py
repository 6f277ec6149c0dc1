"""Stage 6: training one ensemble member, resumably.

Network types (DESIGN.md section 5):
  baseline  five randomly initialised sub-networks trained directly (lr 1e-2)
  ftl       five networks pre-trained on all 68 points, then classifiers; members differ by seed
  el        one network per part: the landmark pre-training regresses only that part's points

Transfer learning runs three phases: `landmarks` (extractor + landmark head,
L1, lr 1e-2), `head` (the classification head on the frozen extractor, lr
1e-2), `finetune` (everything, lr 1e-4). The baseline runs one phase,
`direct`. Every phase uses Adam(0.9, 0.999, 1e-7), batch 32, and stops when
validation loss has not improved for `patience` epochs, restoring its best
weights. A head-only profile (the authors' notebook) stops after `head`.

The authors' notebook chose each checkpoint by its loss on the test fold.
Given the fold's test subjects (`train_member(test=...)`), the member's last
phase also records its loss on them after every epoch and keeps the test
predictions of the epoch where it was lowest: the figure that protocol would
report, from the same training. They are only watched: early stopping, the
weights kept and the member returned are those of the strict run, which
never sees them (a test checks that the two runs match).

A member's checkpoint directory holds `state.json` (phase, epochs done, early
stopping's best value and wait, history) and weights files written after every
epoch, optimizer state included. A killed task called again with the same
directory resumes at the phase and epoch it reached; finished phases are
loaded, not rerun. Initial weights come from initializers seeded by (member
seed, phase) and batches are a function of (seed, phase, epoch), so a run
repeats, and a resumed run follows the path of one that never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from ferpipe.data.parts import ENSEMBLE_PARTS, part_outputs, part_slice
from ferpipe.data.storage import Store, atomic_path, atomic_write
from ferpipe.model.augment import member_seed, stream_seed, to_network_input
from ferpipe.model.examples import Examples, ExampleSet
from ferpipe.model.networks import (
    build_classification_head,
    build_extractor,
    build_landmark_head,
    build_landmark_network,
    build_subnetwork,
    extractor_of,
    head_of,
    infer_compiled,
)
from ferpipe.model.profiles import NETWORK_TYPES, Profile
from ferpipe.model.stream import BatchStream, Targets, chunk_size, fitting

PHASES = {"baseline": ("direct",), "ftl": ("landmarks", "head", "finetune"), "el": ("landmarks", "head", "finetune")}
STATE_FILE = "state.json"
MODEL_FILE = "model.weights.h5"
# Phase 1's best landmark network (extractor + landmark head) as arrays w0..wN, kept beside the member:
# the landmark study (ferpipe.evaluate.landmark_study) puts this head back on the fine-tuned extractor.
LANDMARK_FILE = "landmarks.weights.npz"

Progress = Callable[[str], None]  # receives a line per epoch (and on resuming)
# Called after each epoch's checkpoint with (step, history row); step counts epochs across phases from 1.
EpochHook = Callable[[int, dict], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One of the five networks of an ensemble."""

    network: str  # baseline, ftl or el
    slot: str  # the column it sits in: eyebrows, eyes, nose, mouth, jaw
    part: str | None  # landmarks its extractor is pre-trained on; None for the baseline
    seed: int

    @property
    def name(self) -> str:
        return f"{self.network}_{self.slot}"

    @property
    def phases(self) -> tuple[str, ...]:
        """Its network's phases; `Profile.phases` says which of them a profile runs."""
        return PHASES[self.network]


def ensemble_members(network: str, seed: int = 0) -> list[Member]:
    """The five members of a network type. For baseline and FTL the slot is only a column name."""
    if network not in NETWORK_TYPES:
        raise ValueError(f"unknown network type {network!r}; expected one of {', '.join(NETWORK_TYPES)}")
    part = {"baseline": lambda slot: None, "ftl": lambda slot: "full", "el": lambda slot: slot}[network]
    return [Member(network, slot, part(slot), member_seed(seed, i)) for i, slot in enumerate(ENSEMBLE_PARTS)]


def member_by_slot(network: str, slot: str, seed: int = 0) -> Member:
    for member in ensemble_members(network, seed):
        if member.slot == slot:
            return member
    raise ValueError(f"unknown slot {slot!r}; expected one of {', '.join(ENSEMBLE_PARTS)}")


@dataclass
class TrainedMember:
    member: Member
    model: keras.Model  # the sub-network: extractor + classification head
    history: list[dict] = field(default_factory=list)  # one row per epoch, all phases
    seconds: float = 0.0  # time spent in epochs (training + validation), summed over resumed runs
    landmark_weights: list | None = None  # phase 1's landmark network weights; None without a landmark phase
    # What selection by the test fold would have kept (only when the test fold was watched): the last phase's
    # epoch with the lowest test loss, {"phase", "epoch", "test_loss", "probabilities": (test images, classes)}.
    test_selected: dict | None = None


def log_progress(line: str) -> None:
    log.info(line)


def adam(learning_rate: float) -> keras.optimizers.Adam:
    return keras.optimizers.Adam(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7)


def _save_snapshot(model: keras.Model, path: Path) -> None:
    """Weights and optimizer state as plain arrays: ~10 ms, where Keras' save_weights takes ~200."""
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"o{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)})
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _load_snapshot(model: keras.Model, path: Path) -> None:
    """Undo `_save_snapshot` into a model of the same architecture and optimizer."""
    with np.load(path) as arrays:
        weights = [arrays[f"w{i}"] for i in range(len(model.weights))]
        model.set_weights(weights)
        for i, variable in enumerate(model.optimizer.variables):
            variable.assign(arrays[f"o{i}"])


class _Validation:
    """A side put through the network a chunk at a time (from memory when it fits the stream's buffer,
    read again from its packs each epoch when it does not): only a chunk is ever in network form, 80 MB
    at 160 px. The chunks are whole batches, so the outputs are the ones a single pass over every image
    gives. The phase's validation side, and the test side a test-fold run watches."""

    def __init__(self, side: Examples | ExampleSet, targets: Targets, batch_size: int):
        self.side, self.targets, self.batch_size = side, targets, batch_size

    def outputs(self, model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
        """(the network's outputs, the targets), every image of the side in order."""
        outputs, targets = [], []
        for chunk in self.side.chunks(chunk_size(self.batch_size)):
            outputs.append(infer_compiled(model, to_network_input(chunk.images), self.batch_size))
            targets.append(self.targets(chunk.points, chunk.labels))
        return np.concatenate(outputs), np.concatenate(targets)

    def evaluate(self, model: keras.Model, phase: str) -> dict:
        return _losses(phase, *self.outputs(model))


def _losses(phase: str, outputs: np.ndarray, targets: np.ndarray) -> dict:
    """Validation loss (and accuracy) from the network's outputs, as Keras' val_loss would be.

    Computed here rather than by Keras' own validation, which would trace a test
    function every time a workbench model is fitted again; the predict step traced
    once per workbench model serves every member and epoch.
    """
    if phase == "landmarks":
        return {"val_loss": float(np.mean(np.abs(outputs - targets)))}
    return {f"val_{key}": value for key, value in _classification_scores(outputs, targets).items()}


def _classification_scores(outputs: np.ndarray, targets: np.ndarray) -> dict:
    """Categorical cross-entropy (as Keras computes it) and accuracy of softmax outputs against one-hot targets."""
    probabilities = np.clip(outputs, 1e-7, 1 - 1e-7)
    return {
        "loss": float(np.mean(-np.sum(targets * np.log(probabilities), axis=-1))),
        "accuracy": float(np.mean(outputs.argmax(-1) == targets.argmax(-1))),
    }


def _watch_test(run: "_Run", phase: str, epoch: int, model: keras.Model, logs: dict) -> None:
    """The test fold's loss and accuracy this epoch into `logs`; the epoch's test predictions kept when that loss
    is the phase's lowest yet. Kept in the state (a few numbers per test image), so they are saved, mirrored
    and resumed with it in one write."""
    outputs, targets = run.watched.outputs(model)
    scores = _classification_scores(outputs, targets)
    logs.update(test_loss=scores["loss"], test_accuracy=scores["accuracy"])
    kept = run.state.get("test_selected")
    if kept is None or kept["phase"] != phase or scores["loss"] < kept["test_loss"]:
        run.state["test_selected"] = {"phase": phase, "epoch": epoch + 1, "test_loss": scores["loss"],
                                      "probabilities": outputs.astype(float).tolist()}


def _train_epoch(model: keras.Model, stream: BatchStream, epoch: int) -> dict:
    """One pass over the stream's batches for `epoch` (prepared ahead in the stream's thread); the mean of
    each batch's loss (and accuracy).

    A loop of `train_on_batch` rather than `model.fit`: fit feeds a Python
    dataset through tf.data's generator op, which halves the steps per second
    on a CPU (measured: 116 against 270 images/s at 48 px on two cores) and
    leaves the process slower afterwards. Every batch is full, so the plain
    mean equals fit's sample-weighted one.
    """
    with warnings.catch_warnings():
        # Keras turns each batch's logs into numbers with np.array(tensor), which numpy 2 answers with a
        # DeprecationWarning about the copy keyword, once per batch.
        warnings.simplefilter("ignore", DeprecationWarning)
        rows = [model.train_on_batch(inputs, targets, return_dict=True) for inputs, targets in stream.batches(epoch)]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


# BatchNorm's moving statistics are what validation, testing and the frozen-extractor phase see. As an
# average over the last ~10 steps of a network that changes at every step, on a few hundred images they
# lag behind the weights: one demo member's validation accuracy swung between 54% and 86% from epoch to
# epoch while its training accuracy rose steadily, and early stopping chose among those swings. So after
# every epoch that trained the extractor they are recomputed from the training crops themselves
# (un-augmented, as test images come) under the weights as they now are ("precise BN", Wu & Johnson 2021).
# Up to this many images (a seeded draw of the training side), in one traced forward pass: ~2.5 GB of
# activations at 160 px, a few MB at the demo's 48.
PRECISE_BN_IMAGES = 512
# One traced training-mode forward pass per model, with BatchNorm's momentum 0 built in.
_STATISTICS_PASSES: "weakref.WeakKeyDictionary[keras.Model, Callable]" = weakref.WeakKeyDictionary()


def refresh_batch_statistics(model: keras.Model, inputs: np.ndarray) -> None:
    """Set every BatchNormalization layer's moving mean and variance to their values over `inputs`.

    A training-mode forward pass with momentum 0 makes each layer's moving
    statistics those of the whole batch; no weight changes. The pass is traced
    once per model (eager, it cost as much as the epoch it follows). A frozen
    extractor's BatchNorm stays in inference mode and keeps its statistics.
    """
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers or not len(inputs):
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0  # read when the pass is traced, its first call
    try:
        if model not in _STATISTICS_PASSES:
            spec = tf.TensorSpec((None, *inputs.shape[1:]), tf.float32)
            _STATISTICS_PASSES[model] = tf.function(lambda x: model(x, training=True), input_signature=[spec])
        _STATISTICS_PASSES[model](inputs)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def _end_epoch(run: "_Run", phase: str, epochs: int, epoch: int, logs: dict, seconds: float, model: keras.Model,
               validation, reference: np.ndarray | None) -> bool:
    """Fresh BatchNorm statistics from `reference` (None: the extractor is frozen), validation, early
    stopping, the epoch's checkpoint and progress line; True when the phase should stop."""
    state, monitor = run.state, "val_loss" if validation is not None else "loss"
    if reference is not None:
        refresh_batch_statistics(model, reference)
    if validation is not None:
        logs.update(validation.evaluate(model, phase))
    if run.watched is not None and phase == run.last_phase:  # recorded only; nothing below reads it
        _watch_test(run, phase, epoch, model, logs)
    value = logs[monitor]
    if value < state["best"]:
        state["best"], state["wait"] = value, 0
        _save_snapshot(model, run.path(f"{phase}.best.npz"))
    else:
        state["wait"] += 1
    state["epoch"] = epoch + 1
    state["seconds"] += seconds
    state["history"].append({"phase": phase, "epoch": epoch + 1, **logs, "seconds": round(seconds, 3)})
    _save_snapshot(model, run.path(f"{phase}.last.npz"))
    run.save_state()
    if run.on_epoch is not None:  # after the checkpoint: what it reports is never rolled back
        run.on_epoch(len(state["history"]), state["history"][-1])
    shown = " ".join(f"{k} {v:.4f}" for k, v in logs.items())
    run.progress(f"{run.member.name} seed {run.member.seed} {phase} epoch {epoch + 1}/{epochs} {shown} ({seconds:.1f}s)")
    return state["wait"] >= run.profile.patience


class _Run:
    """The state of one member's training in its checkpoint directory, mirrored to a store when given one.

    A pod's local folder dies with the pod. With a mirror (an S3 prefix on the
    cluster) every file the checkpoint changes is copied there each time the
    state is saved, state.json last, so the mirror never names a snapshot it
    lacks; a task restarted on another node with an empty folder pulls the
    mirror first and resumes at the last epoch written.
    """

    def __init__(self, member: Member, profile: Profile, directory: Path, fingerprint: dict, progress: Progress,
                 mirror: Store | None = None, on_epoch: EpochHook | None = None,
                 watched: "_Validation | None" = None):
        self.member, self.profile, self.directory, self.progress = member, profile, directory, progress
        self.mirror, self.pushed, self.on_epoch = mirror, {}, on_epoch
        # The test fold's side when its loss is recorded (`_watch_test`), else None.
        self.watched = watched
        self.last_phase = profile.phases(member.phases)[-1]
        directory.mkdir(parents=True, exist_ok=True)
        saved = self.path(STATE_FILE)
        if mirror is not None and not saved.exists() and mirror.exists(STATE_FILE):
            self._pull()
        if saved.exists():
            self.state = json.loads(saved.read_text())
            if self.state["fingerprint"] != fingerprint:
                raise ValueError(
                    f"checkpoint {directory} was made for other settings or data; use a fresh directory "
                    f"(saved {self.state['fingerprint']}, now {fingerprint})"
                )
        else:
            self.state = {"fingerprint": fingerprint, "done": [], "phase": None, "epoch": 0, "best": math.inf,
                          "wait": 0, "seconds": 0.0, "history": [], "complete": False}

    def path(self, name: str) -> Path:
        return self.directory / name

    def save_state(self) -> None:
        atomic_write(self.path(STATE_FILE), json.dumps(self.state, indent=1))
        if self.mirror is not None:
            self._push()

    def _pull(self) -> None:
        for key in sorted(self.mirror.list(), key=lambda k: k == STATE_FILE):  # state.json last
            atomic_write(self.path(key), self.mirror.read_bytes(key))
            self.pushed[key] = self.path(key).stat().st_mtime_ns
        self.progress(f"{self.member.name}: checkpoint restored from {self.mirror.uri}")

    def _push(self) -> None:
        files = [p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith(".")]
        for path in sorted(files, key=lambda p: p.name == STATE_FILE):  # state.json last
            stamp = path.stat().st_mtime_ns
            if self.pushed.get(path.name) != stamp:
                self.mirror.write_bytes(path.name, path.read_bytes())
                self.pushed[path.name] = stamp

    def begin(self, phase: str) -> None:
        if self.state["phase"] != phase:
            self.state.update(phase=phase, epoch=0, best=math.inf, wait=0)
            self.save_state()

    def finish(self, phase: str) -> None:
        self.state["done"].append(phase)
        self.state.update(phase=None, epoch=0, best=math.inf, wait=0)
        self.save_state()


def _fingerprint(member: Member, profile: Profile, train: Examples | ExampleSet,
                 val: Examples | ExampleSet | None, test: Examples | ExampleSet | None) -> dict:
    fingerprint = {
        "member": asdict(member),
        "profile": json.loads(json.dumps(asdict(profile))),
        "classes": list(train.classes),
        "input_size": train.size,
        "train": len(train),
        "val": len(val) if val is not None else 0,
    }
    if test is not None:  # a strict run's fingerprint stays what it was
        fingerprint["watched_test"] = len(test)
    return fingerprint


class _Workbench:
    """Compiled models reused from member to member, so each training step is traced once per process.

    Tracing a Keras training step costs 2-4 s on a CPU, more than a smoke or
    demo member's whole training, and a model re-traces whenever it is
    compiled. So each kind of phase model is built and compiled once per
    (input size, classes, BatchNorm momentum) and a member's phase starts by
    loading its initial weights into it and zeroing the optimizer: the same
    start as a fresh model. Head training and fine-tuning use different
    models because freezing changes what the traced step updates.
    """

    def __init__(self, input_size: int, classes: int, bn_momentum: float):
        self.input_size, self.classes, self.bn_momentum = input_size, classes, bn_momentum
        self.models: dict[tuple, keras.Model] = {}

    def model(self, phase: str, outputs: int = 0) -> keras.Model:
        key = ("landmarks", outputs) if phase == "landmarks" else ("head",) if phase == "head" else ("full",)
        if key not in self.models:
            extractor = build_extractor(self.input_size, bn_momentum=self.bn_momentum)
            if phase == "landmarks":
                model = build_landmark_network(extractor, outputs)
                model.compile(adam(1e-2), loss="mean_absolute_error", jit_compile=False)
            else:
                model = build_subnetwork(extractor, self.classes)
                # Freezing also puts BatchNorm in inference mode (Keras 3): the head learns on
                # exactly the features the landmark phase produced.
                extractor.trainable = phase != "head"
                model.compile(adam(1e-2), loss="categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
            # Built now, the optimizer's slots exist before the first step; built lazily,
            # they make tf.function trace the step twice.
            model.optimizer.build(model.trainable_variables)
            self.models[key] = model
        return self.models[key]


_WORKBENCHES: dict[tuple, _Workbench] = {}


def _workbench(input_size: int, classes: int, bn_momentum: float) -> _Workbench:
    key = (input_size, classes, bn_momentum)
    if key not in _WORKBENCHES:
        _WORKBENCHES[key] = _Workbench(*key)
    return _WORKBENCHES[key]


def _start_phase(model: keras.Model, extractor_weights: list, head_weights: list, learning_rate: float) -> None:
    """Put a member's starting weights into a workbench model and give it a fresh Adam."""
    extractor_of(model).set_weights(extractor_weights)
    head_of(model).set_weights(head_weights)
    for variable in model.optimizer.variables:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    model.optimizer.learning_rate = learning_rate


def _phase_rate(phase: str, profile: Profile) -> float:
    return profile.finetune_learning_rate if phase == "finetune" else profile.learning_rate


# A fresh landmark head's outputs are of order 1 (an initial L1 loss of ~1.2 on [0, 1] coordinates,
# where always answering the mean face is ~0.02 off), and a short run spends its steps unlearning
# that. Starting from the training set's mean shape, with the output kernel scaled down so the
# first predictions stay near it, the extractor learns offsets from the mean face from step one.
# The paper does not say how the head starts; this changes no parameter count.
MEAN_SHAPE_KERNEL_SCALE = 0.01


def start_at_mean_shape(head_weights: list, mean_points: np.ndarray) -> list:
    """A landmark head's initial weights whose output is (nearly) `mean_points` (P, 2), the training mean."""
    *hidden, kernel, bias = head_weights
    return [*hidden, kernel * MEAN_SHAPE_KERNEL_SCALE, mean_points.reshape(-1).astype(bias.dtype)]


def _targets(phase: str, member: Member, classes: int) -> Targets:
    if phase == "landmarks":
        points = part_slice(member.part)
        return lambda moved, labels: moved[:, points].reshape(len(labels), -1)
    one_hot = np.eye(classes, dtype=np.float32)
    return lambda moved, labels: one_hot[labels]


def _fit_phase(run: _Run, phase: str, index: int, model: keras.Model, train: Examples | ExampleSet,
               val: Examples | ExampleSet | None) -> None:
    profile, member = run.profile, run.member
    epochs = profile.epochs(phase)
    targets = _targets(phase, member, len(train.classes))
    stream = BatchStream(train, targets, profile.batch_size, seed=stream_seed(member.seed, index),
                         settings=profile.augment)
    validation = _Validation(val, targets, profile.batch_size) if val is not None and len(val) else None
    reference = None
    if phase != "head":  # the head phase trains on a frozen extractor, whose statistics stay as they are
        rows = np.random.default_rng(stream.seed).permutation(len(train))[:PRECISE_BN_IMAGES]
        reference = to_network_input(train.take(np.sort(rows)).images)
    resumed = run.state["epoch"]
    if resumed:
        _load_snapshot(model, run.path(f"{phase}.last.npz"))
        run.progress(f"{member.name} {phase}: resuming after epoch {resumed}")
    # The stream shuffles itself, seeded by (seed, epoch): a resumed run sees the batches an uninterrupted one would.
    for epoch in range(resumed, epochs):
        if run.state["wait"] >= profile.patience:
            break
        started = time.perf_counter()
        logs = _train_epoch(model, stream, epoch)
        if _end_epoch(run, phase, epochs, epoch, logs, time.perf_counter() - started, model, validation, reference):
            break
    best = run.path(f"{phase}.best.npz")
    if best.exists():
        _load_snapshot(model, best)
    _save_snapshot(model, run.path(f"{phase}.final.npz"))


def train_member(
    member: Member,
    train: Examples | ExampleSet,
    val: Examples | ExampleSet | None,
    profile: Profile,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: Progress = log_progress,
    mirror: Store | None = None,
    on_epoch: EpochHook | None = None,
    test: Examples | ExampleSet | None = None,
) -> TrainedMember:
    """Train one ensemble member on one fold's data; resumes from `checkpoint_dir` when it holds a run.

    `mirror` keeps a copy of the checkpoint in a store after every epoch (and
    fills an empty `checkpoint_dir` from it): how a task survives losing its pod.

    `train` and `val` must be at `profile.input_size`: in memory, or as rows whose crops stream from
    their packs (ferpipe.model.stream: a side that fits its buffer is read into memory once, here, and
    anything bigger streams, so memory does not grow with the data). Returns the sub-network
    (a model of its own) with the best weights of its last phase, and one
    history row per epoch. `on_epoch` hears each epoch's row once its checkpoint is written.
    `test` (the fold's test subjects) is given only for the optimistic protocol: the last phase's rows then
    carry test_loss and test_accuracy, and `test_selected` what the lowest test loss would have kept.
    """
    if train.size != profile.input_size:
        raise ValueError(f"examples are {train.size}px, profile {profile.name!r} wants {profile.input_size}px")
    if checkpoint_dir is None:
        with tempfile.TemporaryDirectory(prefix="ferpipe-member-") as scratch:
            return train_member(member, train, val, profile, scratch, progress, mirror, on_epoch, test)
    train, val = fitting(train), (fitting(val) if val is not None else None)
    watched = None
    if test is not None:
        # Scored as the classification phases are: the labels one-hot (any phase but landmarks gives that).
        watched = _Validation(fitting(test), _targets("head", member, len(train.classes)), profile.batch_size)
    run = _Run(member, profile, Path(checkpoint_dir), _fingerprint(member, profile, train, val, test), progress,
               mirror, on_epoch, watched)
    classes = len(train.classes)
    # The returned model is built first, from the member's seed: its fresh extractor is the
    # member's starting point (one model build fewer per member).
    extractor = build_extractor(profile.input_size, bn_momentum=profile.bn_momentum, seed=member.seed * 16)
    result = build_subnetwork(extractor, classes, name=member.name)
    if run.state["complete"]:
        result.load_weights(run.path(MODEL_FILE))
        return TrainedMember(member, result, run.state["history"], run.state["seconds"],
                             load_landmark_weights(run.path(LANDMARK_FILE)), _test_selected(run))

    bench = _workbench(profile.input_size, classes, profile.bn_momentum)
    extractor_weights = extractor_of(result).get_weights()
    head_weights: list = []
    landmark_weights = None
    for index, phase in enumerate(profile.phases(member.phases)):
        # Each phase's new head has its own seed, so a resumed run builds the same heads.
        head_seed = member.seed * 16 + index + 1
        if phase == "landmarks":
            model = bench.model(phase, part_outputs(member.part))
            head = build_landmark_head(part_outputs(member.part), seed=head_seed).get_weights()
            head_weights = start_at_mean_shape(head, train.mean_points()[part_slice(member.part)])
        else:
            model = bench.model(phase)
            if phase != "finetune":  # finetune keeps the head the head phase trained
                head_weights = build_classification_head(classes, seed=head_seed).get_weights()
        if phase in run.state["done"]:
            _load_snapshot(model, run.path(f"{phase}.final.npz"))
        else:
            run.begin(phase)
            _start_phase(model, extractor_weights, head_weights, _phase_rate(phase, profile))
            _fit_phase(run, phase, index, model, train, val)
            run.finish(phase)
        extractor_weights = extractor_of(model).get_weights()
        if phase != "landmarks":
            head_weights = head_of(model).get_weights()
        else:
            landmark_weights = model.get_weights()

    extractor_of(result).set_weights(extractor_weights)
    head_of(result).set_weights(head_weights)
    if landmark_weights is not None:
        with atomic_path(run.path(LANDMARK_FILE)) as tmp:
            np.savez(tmp, **{f"w{i}": w for i, w in enumerate(landmark_weights)})
    with atomic_path(run.path(MODEL_FILE)) as tmp:  # the weights file a finished member is handed on as
        result.save_weights(tmp)
    run.state["complete"] = True
    run.save_state()
    return TrainedMember(member, result, run.state["history"], run.state["seconds"], landmark_weights,
                         _test_selected(run))


def _test_selected(run: _Run) -> dict | None:
    kept = run.state.get("test_selected")
    if run.watched is None or kept is None:
        return None
    return {**kept, "probabilities": np.asarray(kept["probabilities"], np.float32)}


def load_landmark_weights(path: str | os.PathLike) -> list | None:
    """The arrays `LANDMARK_FILE` holds, in the landmark network's weight order; None if there is no file."""
    if not Path(path).is_file():
        return None
    with np.load(path) as arrays:
        return [arrays[f"w{i}"] for i in range(len(arrays.files))]


def load_member(member: Member, classes: int, input_size: int, weights: str | os.PathLike) -> keras.Model:
    """A trained member's sub-network from its `model.weights.h5`."""
    model = build_subnetwork(build_extractor(input_size), classes, name=member.name)
    model.load_weights(weights)
    return model
