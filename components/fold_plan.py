"""Fold planning: the test folds of the dataset's protocol, checked subject-independent."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fold_plan(annotated: Input[Dataset], max_folds: int, plan: Output[Markdown]) -> List[int]:
    """The fold ids to train (the first max_folds when > 0) and a table of who is tested where."""
    from ferpipe.console import for_task
    from ferpipe.data.folds import check_subject_independence, fold_ids, fold_summary
    from ferpipe.data.manifest import read_manifest

    for_task()
    manifest = read_manifest(annotated.path)
    check_subject_independence(manifest)
    folds = fold_ids(manifest)
    folds = folds[:max_folds] if max_folds > 0 else folds
    with open(plan.path, "w") as out:
        out.write(fold_summary(manifest, folds))
    return folds
