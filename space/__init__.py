"""The Gradio search page of a PUMA Space (`app.py`, run as `python space/app.py`). Installed as `puma_space` so
that `space_puma` can write a Space folder from an installed copy."""
