"""ferpipe: landmark-aware, part-based ensemble transfer learning for facial expression recognition.

The library, in packages by role. Each may import only the packages listed
before it (tests/test_layout.py reads the imports and checks it):

    errors, console   what every package may use: user errors, logging and progress
    data              datasets as they arrive: adapters, manifests, folds, storage, fingerprints, the 68-point parts
    preprocess        stages 1-4 over one record (input, CLAHE, detection, landmarks), their chain, cache and previews
    model             stage 5's augmentation, the networks, profiles, training, the ensemble, export, complexity
    evaluate          scores, Table I, confusion matrices, Grad-CAM
    crossval          cross-validation end to end: fold datasets, per-fold steps, member cache, tracking, reports
    serving           the final ensemble as an MLflow pyfunc on raw images, batch prediction, the Model Registry
    demo              the SYNTHETIC demo dataset (imports data only; not on any stage's path)
    cli               the `ferpipe` command: the one module that reaches the DAG in pipelines/ (lazily)

No module here imports kfp; components/ and pipelines/ import ferpipe, never the reverse.
"""

__version__ = "0.1.0"
