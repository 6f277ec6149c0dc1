"""The method: stage 5's augmentation, the networks, profiles, training (stage 6), the ensemble (stage 7).

Training runs in *phases* (landmarks, head, finetune; the baseline's single
phase is direct), never called stages: a stage is one of the pipeline's seven.
`examples` reads a fold side's crops (all at once, or on demand from their
packs), `stream` turns them into shuffled, augmented, prefetched batches in
bounded memory; `export` fuses the five members into one graph; `complexity`
counts as the paper does. Imports `ferpipe.data`, `ferpipe.preprocess` (PNG decoding) and the base modules.
"""
