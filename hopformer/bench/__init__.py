"""Speed and memory harness for the attention kernels (``hopformer bench``)."""
