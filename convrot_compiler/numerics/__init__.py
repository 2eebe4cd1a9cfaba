"""The reference numerics, in plain torch: the rotations, the quantizers and packing layouts, and the fp8
attention scheme. Every kernel is checked against these; nothing here depends on a kernel or a graph."""
