"""Diffusion teachers: the pipeline families (diffusion), the tiny random pipelines (diffusion_tiny) and the
resolution multiple each needs (teacher_sizes)."""
