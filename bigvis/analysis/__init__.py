"""Analyses built on trained towers: image translatability of words across languages (MMID)."""
