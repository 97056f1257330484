"""StyleAR: the style tokens (style_tokens), the style student built on a LlamaGen or Lumina-mGPT student
(style_student) and the converter of released StyleAR checkpoints (stylear_convert)."""
