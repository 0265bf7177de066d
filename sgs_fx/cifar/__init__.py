"""The paper's CIFAR-10 application of sgs_fx: data, CIFAR-sized models, the training recipe (eager and as one
captured CUDA graph), the demo and its plots. Used by the command line and the benchmarks; the library
(``sgs_fx`` outside this package) never imports it."""
