"""The final ensemble: the five members trained on every usable subject, fused into one graph, exported.

Cross-validation measures the *method*; the model people use is trained
afterwards on all usable subjects (fold_dataset.ALL_SUBJECTS), with early
stopping watching validation subjects drawn from those same subjects, so no
test subject ever chose a weight. Its expected accuracy is the
cross-validated one, which is why that figure travels with it.
"""

from __future__ import annotations

from typing import Sequence

from ferpipe.crossval.fold_dataset import ALL_SUBJECTS, read_fold_info
from ferpipe.crossval.steps import load_trained_members
from ferpipe.model.profiles import get_profile
from ferpipe.preprocess.chain import PreprocessSettings
from ferpipe.serving.limits import ServingLimits


def export_final_model(fold_dir: str, network: str, member_dirs: Sequence[str], profile: str, out_dir: str,
                       settings: PreprocessSettings, seed: int = 0, dataset: str | None = None,
                       limits: ServingLimits = ServingLimits()) -> dict:
    """Fuse the five final members (training tasks' outputs) into the pyfunc directory `out_dir`; its info.

    `limits` bound what one request may hold and, with `path_roots`, let the model read files on its server.
    """
    import keras

    from ferpipe.model.export import build_ensemble_model
    from ferpipe.serving.pyfunc import save_pyfunc, serving_info

    info = read_fold_info(fold_dir)
    if info["fold"] != ALL_SUBJECTS:
        raise ValueError(f"the final model trains on all subjects, not on cross-validation fold {info['fold']}")
    chosen = get_profile(profile, dataset)
    members, models, by_slot = load_trained_members(member_dirs, network, seed, len(info["classes"]),
                                                    chosen.input_size, "the final model")
    graph = build_ensemble_model(models, [m.slot for m in members])
    training = {"train_images": info["train_images"], "augment": info["augment"],
                "val_images": info["val_images"], "profile": chosen.name, "seed": seed,
                "epochs_run": {m.slot: len(by_slot[m.slot][1].get("history", [])) for m in members}}
    described = serving_info(info["classes"], [m.slot for m in members], network, chosen.input_size, settings,
                             limits, dataset=dataset, training=training)
    save_pyfunc(graph, described, out_dir)
    keras.backend.clear_session()
    return described
