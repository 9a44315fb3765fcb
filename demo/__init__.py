"""The Gradio demo's library: upload checks and per-session folders (`demo.inputs`), preview and edit jobs
(`demo.jobs`). `app.py` is the page; nothing here imports gradio."""
