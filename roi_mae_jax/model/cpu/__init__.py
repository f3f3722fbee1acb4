"""The CPU-only model code, used only when the mesh is on CPU
(`platforms.Target.cpu_paths`): fused layer-norm + matmul layers with a
hand-written backward, and attention scanned over query slices.
"""
