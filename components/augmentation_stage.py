"""Stage 5, augmentation: one fold's split by subject and the plan training augments by."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def augmentation_stage(annotated: Input[Dataset], fold: int, profile: str, dataset: str, seed: int,
                       fold_data: Output[Dataset], preview: Output[HTML], selection: str = "validation",
                       expression: str = ""):
    """Split the fold by subject; record the seeded plan (flip, rotation, shear, shift of each crop and its
    landmarks together) that the training tasks draw afresh every epoch, and a picture of what they draw.
    The plan also names the expression phase (`expression`, '' for the profile's own) and how members choose
    their checkpoints (`selection`; test-fold lets them watch the test side for the optimistic figure)."""
    import base64

    from ferpipe.console import for_task
    from ferpipe.crossval.fold_dataset import PREVIEW_FILE, check_no_leak, write_fold_dataset
    from ferpipe.model.profiles import get_profile

    for_task()
    info = write_fold_dataset(annotated.path, int(fold), get_profile(profile, dataset, expression or None),
                              fold_data.path, seed, selection)
    check_no_leak(fold_data.path)
    fold_data.metadata.update({k: v for k, v in info.items() if k != "augment"})
    with open(f"{fold_data.path}/{PREVIEW_FILE}", "rb") as file:
        picture = base64.b64encode(file.read()).decode()
    with open(preview.path, "w") as page:
        page.write(f"<html><body><h3>Fold {info['fold']}: what training draws</h3><p>The first images of the "
                   f"first batch in epochs 1-4, landmarks moved with them; plan {info['augment']}, seed "
                   f"{info['seed']}.</p><img src=\"data:image/png;base64,{picture}\"/></body></html>")
    print(f"fold {info['fold']}: {info['train_images']} training images (augmented online by plan), "
          f"{info['val_images']} validation, {info['test_images']} test; expression phase {info['expression']}, "
          f"checkpoints selected by {info['selection']}")
