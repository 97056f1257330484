"""`proxytune plan`: each stage's expected peak accelerator memory and time before any GPU hour is spent.

    models    a spec's model references -> components (kind + config), built on the meta device
    steps     the step each stage runs, as a (build, step) pair to trace
    trace     fake-tensor tracing with a live-bytes counter and FLOP counter
    estimate  per-stage weights / gradients / optimiser / activations and time (how it scales: its docstring)
    options   which of the spec's own options bring a stage under the budget
    report    the table and the JSON
    measure   the estimator against the CPU allocator on real small steps
"""
