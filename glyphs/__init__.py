"""Glyphs: a second shipped model on real typefaces (the data set so far: render.py)."""
