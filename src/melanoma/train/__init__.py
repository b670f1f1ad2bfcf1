"""③ Train: `melanoma train` start to finish (data preparation, splits, balancing, augmentation, the Lightning loop,
tracking, scale-out), scoring the run at its end, fitting its gate, and the seed study."""
