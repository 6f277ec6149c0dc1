"""Stage 5, augmentation of one fold's training subjects."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def augmentation_stage(annotated: Input[Dataset], fold: int, profile: str, dataset: str, seed: int,
                       fold_data: Output[Dataset]):
    """Split the fold by subject; flip/rotate/shear/shift each training crop and its landmarks together."""
    from ferpipe.console import for_task
    from ferpipe.crossval.fold_dataset import check_no_leak, copies_for, write_fold_dataset
    from ferpipe.model.profiles import get_profile

    for_task()
    chosen = get_profile(profile, dataset)
    info = write_fold_dataset(annotated.path, int(fold), chosen, copies_for(chosen), fold_data.path, seed)
    check_no_leak(fold_data.path)
    fold_data.metadata.update({k: v for k, v in info.items() if k != "augment"})
    print(f"fold {info['fold']}: {info['train_images']} training images -> {info['train_examples']} examples, "
          f"{info['val_images']} validation, {info['test_images']} test")
