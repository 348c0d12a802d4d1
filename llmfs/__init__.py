"""The machinery that runs the book's code: everything that is not a listing.

Data files (offline mirror, checksums, atomic writes), the runtime (device, quick mode, outputs
folder), the command-line toolkit and its one error path, the training layer (checkpoints, exact
resume, torchrun), generation extras (streaming, the decoding layout, oneDNN routing), the
Ollama-API server and chat layer, and the web apps' common code.

`llmfs` never imports a chapter (a test checks it): what a run needs from one (its model, its loss,
its evaluation, its data set, its prompt format) is passed in by the chapter that uses it.
"""
