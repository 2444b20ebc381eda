"""Running models on data: losses and accuracies (``metrics``), interpolation paths and their
barriers (``paths``), BatchNorm reset and REPAIR (``repair``), and the evaluation a command runs
(``setup``)."""
