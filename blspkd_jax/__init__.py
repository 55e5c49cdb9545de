"""blspkd-jax: BLSP-KD (Wang et al., 2024) in JAX/Flax.

A frozen LLM reading a transcript teaches the same LLM hearing the speech; a CIF adapter cuts the
speech into one vector per transcript token so the two sequences line up 1:1.
"""

__version__ = "0.1.0"
