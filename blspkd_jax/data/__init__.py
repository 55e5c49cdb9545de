"""Data: manifests, audio decoding, the teacher/student token layout, the grain input pipeline."""
