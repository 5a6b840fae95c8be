"""Speed and memory harness for the attention kernels (``hopformer bench``)."""

# What ``hopformer bench`` can measure; here, not in the harness, so that its --help needs no torch.
OPS = ("sdpa", "sparse", "diffuse", "routing", "combiner")
COMBINER_VARIANTS = ("fixed", "logsparse", "axial", "axial_horizontal", "mixture")  # "axial" is the vertical form
