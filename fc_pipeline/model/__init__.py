"""FastComposer model (paper §4.1–4.2): subject prompts, fuser, components, attention capture, losses."""
